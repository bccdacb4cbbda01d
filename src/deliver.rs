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

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::Retryable;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{Config, Webhook};
use crate::format::RenderError;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::retry::{self, TokenBucket};
use crate::store::{AttemptRecord, DelivererStore, DeliveryOutcome, OutboundDelivery, StoreError};
use crate::vocab::{Format, now_ms};

/// Longest wait between looks at the outbox, so deliveries requeued by the
/// CLI (`deliveries retry`) start within about a second.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long the deliverer trusts its copy of the paused webhooks.
const PAUSES_FRESH: Duration = Duration::from_millis(250);
/// Largest part of a receiver's answer kept with an attempt.
const EXCERPT_BYTES: usize = 4096;
/// First wait before writing again an outcome the store refused; it doubles
/// up to [`RECORD_RETRY_MAX`], so a full disk costs a failed write every few
/// seconds, not a re-sent notification.
const RECORD_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two writes of an unrecorded outcome.
const RECORD_RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest panic message kept with the attempt it ended.
const PANIC_TEXT: usize = 200;

/// How a stored standard body becomes what a webhook gets: `format::render`,
/// replaced only by unit tests that need an attempt to panic.
type Render = fn(&Webhook, &str) -> Result<String, RenderError>;

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
    // The id comes from the database: a corrupt row is a failed attempt, not a panic.
    let Ok(id_header) = HeaderValue::from_str(msg_id) else {
        let error = Some("the stored webhook-id is not a valid header value".to_owned());
        return Response { status: None, retry_after: None, excerpt: None, error };
    };
    let text_header = |s: &str| HeaderValue::from_str(s).expect("digits and base64 are valid header values");
    headers.insert("webhook-id", id_header);
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

/// Whether an answer asks the relay to slow down rather than says the
/// delivery failed: a 429, or a 503 that says when to come back.
pub fn is_rate_limit(response: &Response) -> bool {
    match response.status {
        Some(429) => true,
        Some(503) => response.retry_after.is_some(),
        _ => false,
    }
}

/// How long a delivery may keep being rate-limited, from its first attempt,
/// without giving up: the schedule's total time (27 hours by default). Each
/// rate-limit wait is at least `RETRY_AFTER_MIN` (1 s), so a receiver that
/// answers 429 forever costs at most one attempt a second for that long,
/// and then the delivery is `failed` like any other that ran out of time.
pub fn rate_limit_budget(schedule: &[Duration]) -> Duration {
    schedule.iter().fold(Duration::ZERO, |total, &d| total.saturating_add(d))
}

/// Decides what an attempt's response means for its delivery, given how many
/// attempts were counted before it and, for a rate-limit answer, when the
/// delivery was first attempted (`None`: this is its first attempt). Pure,
/// so the rule is tested on its own.
pub fn classify(
    response: &Response,
    attempts_before: u32,
    schedule: &[Duration],
    now_ms: i64,
    unit: f64,
    first_attempt_ms: Option<i64>,
) -> DeliveryOutcome {
    // 410 Gone: the receiver is gone for good; pause the whole webhook
    // rather than spend this delivery's retries.
    if response.status == Some(410) {
        return DeliveryOutcome::Paused;
    }
    if let Some(status) = response.status.filter(|_| response.is_success()) {
        return DeliveryOutcome::Delivered { status };
    }
    let error = match (&response.error, response.status) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => "no answer".to_owned(),
    };
    let retry_number = attempts_before as usize + 1;
    if is_rate_limit(response) {
        // A receiver asking to slow down has not failed the delivery: wait
        // as asked (bounded to [1 s, 1 h]) without counting a retry, within
        // the schedule's total time from the first attempt.
        let budget = rate_limit_budget(schedule);
        let waited = now_ms.saturating_sub(first_attempt_ms.unwrap_or(now_ms)).max(0);
        if u128::from(waited.unsigned_abs()) >= budget.as_millis() {
            let error = format!("{error}: still rate limited after the retry schedule's total time");
            return DeliveryOutcome::GaveUp { error };
        }
        let wait = response.retry_after.unwrap_or_else(|| {
            // A 429 that does not say how long: the schedule's next wait.
            let scheduled = retry::delivery_retry_delay(schedule, retry_number, None, unit);
            scheduled.or_else(|| schedule.last().copied()).unwrap_or(retry::RETRY_AFTER_MIN)
        });
        let wait = retry::clamp_retry_after(wait);
        return DeliveryOutcome::RateLimited { at_ms: now_ms.saturating_add(millis(wait)), wait, error };
    }
    match retry::delivery_retry_delay(schedule, retry_number, response.retry_after, unit) {
        Some(wait) => DeliveryOutcome::RetryAt { at_ms: now_ms.saturating_add(millis(wait)), error },
        None => DeliveryOutcome::GaveUp { error },
    }
}

/// A duration in whole milliseconds, rounded up (so a wait of 0.4 ms is not
/// a wait of 0 that wakes the loop at once) and saturating: a wait from
/// the config or a receiver never overflows the Unix-ms clock.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX)
}

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
}

/// What an attempt task hands back to the loop.
struct AttemptDone {
    /// The receiver answered 410 Gone: pause the webhook.
    gone: bool,
    /// The receiver asked to slow down for this long.
    slow_down: Option<Duration>,
    /// The outcome the store refused to record, for the loop to keep.
    unrecorded: Option<Unrecorded>,
}

/// One spawned attempt, as the loop knows it.
struct Spawned {
    chain: (String, String),
    delivery_id: i64,
    /// Attempts counted before this one.
    attempts: u32,
}

/// An attempt's outcome that the store refused, kept until it is written.
struct Unrecorded {
    delivery_id: i64,
    record: AttemptRecord,
    outcome: DeliveryOutcome,
    /// Failed writes so far (they set the backoff).
    tries: u32,
    /// When to write it again.
    retry_at: Instant,
}

/// Writes an attempt's outcome.
async fn record(
    store: &dyn DelivererStore,
    id: i64,
    attempt: AttemptRecord,
    outcome: &DeliveryOutcome,
) -> Result<(), StoreError> {
    store.record_attempt(id, attempt, outcome.clone()).await
}

/// The wait before writing an unrecorded outcome again after `tries` failures.
fn record_backoff(tries: u32) -> Duration {
    RECORD_RETRY_MIN.saturating_mul(1u32 << tries.min(16)).min(RECORD_RETRY_MAX)
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
            config_rx,
            config: Arc::clone(&config),
            store,
            wake,
            metrics,
            health,
            in_flight: HashSet::new(),
            per_webhook: HashMap::new(),
            rate_limits: HashMap::new(),
            slowed: HashMap::new(),
            epoch: Instant::now(),
            paused: HashSet::new(),
            paused_read_at: None,
            tasks: JoinSet::new(),
            spawned: HashMap::new(),
            unrecorded: HashMap::new(),
            render: Webhook::render,
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
        self.slowed.retain(|name, _| config.webhooks.iter().any(|w| &w.name == name));
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
                    Duration::from_millis(next_ms.saturating_sub(now_ms()).max(0) as u64).min(IDLE_CHECK)
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
        let now = now_ms();
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
        Some(now_ms().saturating_add(millis(earliest.saturating_duration_since(Instant::now()))))
    }

    /// Starts an attempt for every due chain head that is not in flight,
    /// webhook by webhook, within each webhook's limits. Returns when the
    /// earliest head not started is due (Unix ms), if any. The loop's one
    /// step; tests call it directly.
    pub async fn deliver_due_once(&mut self) -> Result<Option<i64>, StoreError> {
        let mut next_due: Option<i64> = self.record_outstanding().await;
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
            if busy >= webhook.max_in_flight {
                continue;
            }
            // The receiver asked to slow down: none of its deliveries starts
            // before the time it gave.
            if let Some(until) = self.slowed.get(&webhook.name) {
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    due_at(now_ms().saturating_add(millis(left)), &mut next_due);
                    continue;
                }
            }
            // Heads of chains in flight or waiting for a record come back
            // too; ask for enough.
            let held = self.unrecorded.keys().filter(|(_, w)| *w == webhook.name).count();
            let limit = busy + held + webhook.max_in_flight + 16;
            let name = webhook.name.clone();
            let heads = self.store.pending_heads(name, limit).await?;
            let now = now_ms();
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
                if self.per_webhook.get(&webhook.name).copied().unwrap_or(0) >= webhook.max_in_flight {
                    break;
                }
                let elapsed = self.epoch.elapsed();
                if let Some(Err(wait)) = self.rate_limits.get_mut(&webhook.name).map(|b| b.take(elapsed)) {
                    due_at(now.saturating_add(millis(wait)), &mut next_due);
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
            for delivery in self.store.outbound(ids).await? {
                let chain = (delivery.job_id.clone(), delivery.webhook.clone());
                let id = delivery.id;
                let attempts = delivery.attempts;
                let attempt = Attempt {
                    http: self.http.clone(),
                    metrics: Arc::clone(&self.metrics),
                    store: Arc::clone(&self.store),
                    schedule: self.config.delivery.retry_schedule.clone(),
                    webhook: webhook.clone(),
                    render: self.render,
                    delivery,
                };
                let span = info_span!("deliver", job_id = %chain.0, webhook = %chain.1, delivery_id = id, attempt = attempts + 1);
                let handle = self.tasks.spawn(attempt.run().instrument(span));
                self.spawned.insert(handle.id(), Spawned { chain, delivery_id: id, attempts });
            }
        }
        Ok(next_due)
    }
}

/// One attempt of one delivery, run in its own task.
struct Attempt {
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    store: Arc<dyn DelivererStore>,
    schedule: Vec<Duration>,
    webhook: Webhook,
    render: Render,
    delivery: OutboundDelivery,
}

impl Attempt {
    /// Makes the attempt and records it. A 410 Gone pauses the webhook (the
    /// delivery stays pending, due at once, for when it is resumed); a rate
    /// limit slows the webhook down; an outcome the store refuses goes back
    /// to the loop, which keeps it and writes it later.
    async fn run(self) -> AttemptDone {
        let started_ms = now_ms();
        let clock = Instant::now();
        let id = self.delivery.id;
        let (response, outcome) = match (self.render)(&self.webhook, &self.delivery.body) {
            Ok(body) => {
                let response = send(&self.http, &self.webhook, &self.delivery.msg_id, body).await;
                // Only a rate-limit answer needs to know how long the
                // delivery has been trying; an unreadable answer counts as
                // "from now", which errs on the side of not giving up.
                let first = match is_rate_limit(&response) {
                    true => self.store.first_attempt_at(id).await.unwrap_or(None),
                    false => None,
                };
                let outcome =
                    classify(&response, self.delivery.attempts, &self.schedule, now_ms(), fastrand::f64(), first);
                (response, outcome)
            }
            Err(e) => {
                // A body that cannot be rendered will not render next time
                // either (the stored body and the template are both fixed).
                let error = e.to_string();
                let response = Response { status: None, retry_after: None, excerpt: None, error: Some(error.clone()) };
                (response, DeliveryOutcome::GaveUp { error })
            }
        };
        self.metrics.delivery(&self.webhook.name, outcome.label());
        let mut slow_down = None;
        match &outcome {
            DeliveryOutcome::Delivered { status } => {
                let latency_ms = now_ms().saturating_sub(self.delivery.detected_at);
                self.metrics.delivery_latency(&self.webhook.name, latency_ms.max(0) as f64 / 1000.0);
                info!(status, kind = %self.delivery.kind, latency_ms, "delivered");
            }
            DeliveryOutcome::RetryAt { at_ms, error } => {
                warn!(%error, kind = %self.delivery.kind, retry_in_ms = at_ms.saturating_sub(now_ms()), "delivery failed; will retry");
            }
            DeliveryOutcome::GaveUp { error } => {
                error!(%error, kind = %self.delivery.kind, "delivery failed for the last time; kept as failed");
            }
            DeliveryOutcome::Paused => {}
            DeliveryOutcome::RateLimited { wait, error, .. } => {
                warn!(%error, kind = %self.delivery.kind, wait_ms = millis(*wait), "rate limited; waiting without spending a retry");
                slow_down = Some(*wait);
            }
        }
        let error = outcome.error().map(str::to_owned);
        let gone = matches!(outcome, DeliveryOutcome::Paused);
        let record_ = AttemptRecord {
            attempted_at: started_ms,
            duration_ms: i64::try_from(clock.elapsed().as_millis()).unwrap_or(i64::MAX),
            http_status: response.status,
            response_excerpt: response.excerpt,
            error: error.or(response.error),
        };
        let store = &*self.store;
        let write_once = || async { record(store, id, record_.clone(), &outcome).await };
        // A brief lock clears within these retries; a lasting refusal (a
        // full or read-only disk) goes back to the loop, which keeps the
        // outcome and keeps the chain from being sent again.
        let result = write_once.retry(retry::policy::attempt_record()).await;
        let unrecorded = match result {
            Ok(()) => {
                debug!("attempt recorded");
                None
            }
            Err(e) => {
                error!(error = %e, outcome = outcome.label(), "cannot record the attempt; its outcome is kept in memory and written when the store accepts it, and the delivery is not sent again meanwhile");
                Some(Unrecorded {
                    delivery_id: id,
                    record: record_,
                    outcome,
                    tries: 1,
                    retry_at: instant_after(Instant::now(), record_backoff(1)),
                })
            }
        };
        AttemptDone { gone, slow_down, unrecorded }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::Body;
    use crate::store::Store;
    use crate::vocab::NotificationKind;

    fn response(status: Option<u16>, retry_after: Option<u64>) -> Response {
        Response { status, retry_after: retry_after.map(Duration::from_secs), excerpt: None, error: None }
    }

    #[test]
    fn only_2xx_is_delivered_and_the_schedule_runs_out() {
        let schedule = [Duration::from_secs(5), Duration::from_secs(300)];
        assert_eq!(
            classify(&response(Some(204), None), 0, &schedule, 0, 0.5, None),
            DeliveryOutcome::Delivered { status: 204 }
        );
        assert_eq!(
            classify(&response(Some(500), None), 0, &schedule, 1_000, 0.5, None),
            DeliveryOutcome::RetryAt { at_ms: 6_000, error: "HTTP 500".into() }
        );
        assert_eq!(
            classify(&response(Some(302), None), 1, &schedule, 0, 0.5, None),
            DeliveryOutcome::RetryAt { at_ms: 300_000, error: "HTTP 302".into() }
        );
        // A 503 with Retry-After is a rate limit: it waits, uncounted.
        assert_eq!(
            classify(&response(Some(503), Some(9)), 1, &schedule, 0, 0.5, None),
            DeliveryOutcome::RateLimited { at_ms: 9_000, wait: Duration::from_secs(9), error: "HTTP 503".into() }
        );
        assert_eq!(
            classify(&response(None, None), 2, &schedule, 0, 0.5, None),
            DeliveryOutcome::GaveUp { error: "no answer".into() }
        );
        // 410 pauses the webhook, whatever is left of the schedule.
        assert_eq!(classify(&response(Some(410), None), 0, &schedule, 0, 0.5, None), DeliveryOutcome::Paused);
        assert_eq!(classify(&response(Some(410), None), 2, &schedule, 0, 0.5, None), DeliveryOutcome::Paused);
    }

    #[test]
    fn a_rate_limit_waits_without_spending_a_retry_within_the_schedules_time() {
        let schedule = [Duration::from_secs(5), Duration::from_secs(300)];
        let limited = |status: u16, retry_after: Option<Duration>| Response {
            status: Some(status),
            retry_after: retry_after.map(retry::clamp_retry_after),
            excerpt: None,
            error: None,
        };
        let zero = limited(429, Some(Duration::ZERO));
        // Retry-After: 0 waits the 1 s minimum, whatever was counted before,
        // even with the schedule spent.
        for attempts_before in [0, 1, 2, 7] {
            assert_eq!(
                classify(&zero, attempts_before, &schedule, 10_000, 0.5, Some(9_000)),
                DeliveryOutcome::RateLimited { at_ms: 11_000, wait: Duration::from_secs(1), error: "HTTP 429".into() }
            );
        }
        // A 503 is a rate limit only when it says when to come back.
        let busy = limited(503, Some(Duration::from_secs(30)));
        assert!(matches!(
            classify(&busy, 0, &schedule, 0, 0.5, None),
            DeliveryOutcome::RateLimited { at_ms: 30_000, .. }
        ));
        let down = limited(503, None);
        assert_eq!(
            classify(&down, 0, &schedule, 0, 0.5, None),
            DeliveryOutcome::RetryAt { at_ms: 5_000, error: "HTTP 503".into() }
        );
        // A 429 without Retry-After waits the schedule's next wait, bounded.
        let bare = limited(429, None);
        assert!(matches!(
            classify(&bare, 1, &schedule, 0, 0.5, None),
            DeliveryOutcome::RateLimited { at_ms: 300_000, .. }
        ));
        assert!(matches!(
            classify(&bare, 9, &schedule, 0, 0.5, None),
            DeliveryOutcome::RateLimited { at_ms: 300_000, .. }
        ));
        // Past the schedule's total time (305 s) from the first attempt, it gives up.
        let late = classify(&zero, 0, &schedule, 305_000, 0.5, Some(0));
        assert!(
            matches!(late, DeliveryOutcome::GaveUp { ref error } if error.contains("still rate limited")),
            "{late:?}"
        );
        assert!(matches!(classify(&zero, 0, &schedule, 304_999, 0.5, Some(0)), DeliveryOutcome::RateLimited { .. }));
    }

    #[test]
    fn clock_arithmetic_saturates() {
        let schedule = [Duration::from_secs(5)];
        assert_eq!(
            classify(&response(Some(500), None), 0, &schedule, i64::MAX - 10, 0.5, None),
            DeliveryOutcome::RetryAt { at_ms: i64::MAX, error: "HTTP 500".into() }
        );
        assert_eq!(millis(Duration::MAX), i64::MAX);
        // A sub-millisecond wait is not a wait of 0, which would spin the loop.
        assert_eq!(millis(Duration::from_micros(400)), 1);
        assert_eq!(millis(Duration::ZERO), 0);
        let now = Instant::now();
        assert!(instant_after(now, Duration::MAX) >= now);
        assert_eq!(record_backoff(1), Duration::from_millis(200));
        assert_eq!(record_backoff(u32::MAX), RECORD_RETRY_MAX);
    }

    /// A deliverer over a fresh store with one webhook `h` posting to `url`,
    /// and one pending `watch.failed` delivery to it.
    fn deliverer_with_one_delivery(dir: &std::path::Path, url: &str) -> (Deliverer, Arc<Store>, Arc<Metrics>) {
        use crate::store::{NewDelivery, NewNotification, Sqlite};
        use crate::vocab::NewWatch;
        let text = format!(
            "database = \"{}\"\n[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[delivery]\nretry_schedule = [\"50ms\"]\n\
             [orgs.acme]\napi_key_env = \"K\"\n[[webhooks]]\nname = \"h\"\nurl = \"{url}\"\n",
            dir.join("r.db").display()
        );
        let env = |name: &str| (name == "K").then(|| "k".to_owned());
        let config = Arc::new(Config::from_toml(&text, std::path::Path::new("t.toml"), &env).unwrap());
        let store = Arc::new(Store::open(&config.database).unwrap());
        let job = "550e8400-e29b-41d4-a716-446655440000";
        let watch = NewWatch {
            job_id: job.into(),
            portal: "acme/form".parse().unwrap(),
            webhooks: None,
            labels: Default::default(),
            from_now: false,
        };
        store.add_watches(&[watch]).unwrap();
        let notification = NewNotification {
            kind: NotificationKind::WatchFailed,
            body: Body::Whole(r#"{"type":"watch.failed"}"#.into()),
            deliveries: vec![NewDelivery { webhook: "h".into(), msg_id: "msg_1".into() }],
        };
        store.fail_watch(job, "test", &notification).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (_tx, rx) = watch::channel(config);
        let deliverer = Deliverer::new(
            rx,
            Arc::new(Sqlite(Arc::clone(&store))),
            Arc::clone(&metrics),
            Arc::new(Health::default()),
            Arc::new(Notify::new()),
        )
        .unwrap();
        (deliverer, store, metrics)
    }

    /// A receiver on 127.0.0.1:0 that answers 204 and counts requests.
    async fn counting_receiver() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { axum::http::StatusCode::NO_CONTENT }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (url, hits)
    }

    /// Issue 10 item 11: a panic in an attempt used to leave its chain in
    /// flight forever. Now it is caught, counted, recorded as a failed
    /// attempt, and the chain is retried per the schedule.
    #[tokio::test]
    async fn a_panicking_attempt_is_recorded_and_its_chain_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (url, hits) = counting_receiver().await;
        let (mut deliverer, store, metrics) = deliverer_with_one_delivery(dir.path(), &url);
        deliverer.render = |_, _| panic!("a render that panics");
        deliverer.deliver_due_once().await.unwrap();
        let done = deliverer.tasks.join_next_with_id().await.unwrap();
        assert!(done.as_ref().is_err_and(|e| e.is_panic()));
        deliverer.finish(done).await;
        assert_eq!(metrics.delivery_faults("h", "panicked"), 1);
        assert!(deliverer.in_flight.is_empty() && deliverer.spawned.is_empty(), "the chain is released");
        let delivery = &store.list_deliveries(None, 10).unwrap()[0];
        assert_eq!((delivery.state, delivery.attempts), ("pending", 1), "one retry of the schedule spent");
        let attempts = store.attempts(delivery.id).unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].error.as_deref(), Some("the attempt panicked: a render that panics"));

        // The retry, due after the 50 ms schedule, renders and is delivered.
        deliverer.render = Webhook::render;
        tokio::time::sleep(Duration::from_millis(100)).await;
        deliverer.deliver_due_once().await.unwrap();
        let done = deliverer.tasks.join_next_with_id().await.unwrap();
        deliverer.finish(done).await;
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(store.list_deliveries(None, 10).unwrap()[0].state, "delivered");
    }

    /// A rate-limit answer slows the whole webhook down: until its
    /// Retry-After has passed, no delivery of that webhook starts, and the
    /// step says when to look again.
    #[tokio::test]
    async fn a_rate_limit_holds_the_whole_webhook() {
        let dir = tempfile::tempdir().unwrap();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(|| async { (axum::http::StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3")]) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let (mut deliverer, store, _metrics) = deliverer_with_one_delivery(dir.path(), &url);
        deliverer.deliver_due_once().await.unwrap();
        let done = deliverer.tasks.join_next_with_id().await.unwrap();
        deliverer.finish(done).await;
        let delivery = &store.list_deliveries(None, 10).unwrap()[0];
        assert_eq!((delivery.state, delivery.attempts), ("pending", 0), "deferred, not counted");
        // Another job's delivery to the same webhook, due now, waits too.
        use crate::store::{NewDelivery, NewNotification};
        use crate::vocab::NewWatch;
        let other = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
        let watch = NewWatch {
            job_id: other.into(),
            portal: "acme/form".parse().unwrap(),
            webhooks: None,
            labels: Default::default(),
            from_now: false,
        };
        store.add_watches(&[watch]).unwrap();
        let notification = NewNotification {
            kind: NotificationKind::WatchFailed,
            body: Body::Whole(r#"{"type":"watch.failed"}"#.into()),
            deliveries: vec![NewDelivery { webhook: "h".into(), msg_id: "msg_2".into() }],
        };
        store.fail_watch(other, "test", &notification).unwrap();
        let next = deliverer.deliver_due_once().await.unwrap().expect("a time to look again");
        assert!(deliverer.tasks.is_empty(), "nothing starts while the webhook is slowed");
        let wait = next - now_ms();
        assert!((2_000..=3_000).contains(&wait), "{wait} ms");
    }

    /// A stored webhook-id that is not a valid header value (a corrupt row)
    /// is a failed attempt, not a panic.
    #[tokio::test]
    async fn a_corrupt_webhook_id_fails_the_attempt_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (url, hits) = counting_receiver().await;
        let (deliverer, _store, _metrics) = deliverer_with_one_delivery(dir.path(), &url);
        let webhook = &deliverer.config.webhooks[0];
        let response = send(&deliverer.http, webhook, "msg_1\r\nx-injected: 1", "{}".into()).await;
        assert_eq!(response.status, None);
        assert_eq!(response.error.as_deref(), Some("the stored webhook-id is not a valid header value"));
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
