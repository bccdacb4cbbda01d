//! One attempt of one delivery, and recording what it came to.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::*;
use crate::config::Webhook;
use crate::metrics::Metrics;
use crate::retry::{self};
use crate::store::{AttemptRecord, DelivererStore, DeliveryOutcome, OutboundDelivery, StoreError};
use crate::vocab::Clock;

/// What an attempt task hands back to the loop.
pub(super) struct AttemptDone {
    /// The receiver answered 410 Gone: pause the webhook.
    pub(super) gone: bool,
    /// The receiver asked to slow down for this long (a rate limit, or
    /// its rate-limit window used up).
    pub(super) slow_down: Option<Duration>,
    /// The answer's round trip and what it says of the receiver's load,
    /// for the webhook's concurrency controller.
    pub(super) signal: (Duration, Signal),
    /// The outcome the store refused to record, for the loop to keep.
    pub(super) unrecorded: Option<Unrecorded>,
}

/// An attempt's outcome that the store refused, kept until it is written.
pub(super) struct Unrecorded {
    pub(super) delivery_id: i64,
    pub(super) record: AttemptRecord,
    pub(super) outcome: DeliveryOutcome,
    /// Failed writes so far (they set the backoff).
    pub(super) tries: u32,
    /// When to write it again.
    pub(super) retry_at: Instant,
}

/// Writes an attempt's outcome.
pub(super) async fn record(
    store: &dyn DelivererStore,
    id: i64,
    attempt: AttemptRecord,
    outcome: &DeliveryOutcome,
) -> Result<(), StoreError> {
    store.record_attempt(id, attempt, outcome.clone()).await
}

/// Counts and logs an attempt's outcome for `delivery`, and says how long
/// its webhook should wait before the next request: a receiver that says
/// its window is used up (Discord) is not sent to again before the window
/// resets, so the 429 never comes; a rate limit waits as asked.
pub(super) fn observe(
    metrics: &Metrics,
    webhook: &str,
    delivery: &OutboundDelivery,
    quota: Option<Quota>,
    outcome: &DeliveryOutcome,
    now_ms: i64,
) -> Option<Duration> {
    metrics.delivery(webhook, outcome.label());
    let mut slow_down = quota.and_then(|q| q.wait());
    if let Some(wait) = slow_down {
        debug!(wait_ms = millis(wait), "the receiver's rate-limit window is used up; waiting for its reset");
    }
    match outcome {
        DeliveryOutcome::Delivered { status } => {
            let latency_ms = now_ms.saturating_sub(delivery.detected_at);
            metrics.delivery_latency(webhook, latency_ms.max(0) as f64 / 1000.0);
            info!(status, kind = %delivery.kind, latency_ms, "delivered");
        }
        DeliveryOutcome::RetryAt { at_ms, error } => {
            warn!(%error, kind = %delivery.kind, retry_in_ms = at_ms.saturating_sub(now_ms), "delivery failed; will retry");
        }
        DeliveryOutcome::GaveUp { error } => {
            error!(%error, kind = %delivery.kind, "delivery failed for the last time; kept as failed");
        }
        DeliveryOutcome::Paused => {}
        DeliveryOutcome::RateLimited { wait, error, .. } => {
            warn!(%error, kind = %delivery.kind, wait_ms = millis(*wait), "rate limited; waiting without spending a retry");
            slow_down = Some(slow_down.map_or(*wait, |w| w.max(*wait)));
        }
    }
    slow_down
}

/// Records an attempt's outcome, trying again briefly; a lasting refusal
/// (a full or read-only disk) comes back as the [`Unrecorded`] the loop
/// keeps, so the chain is not sent again until it is written.
pub(super) async fn write_outcome(
    store: &dyn DelivererStore,
    id: i64,
    record_: AttemptRecord,
    outcome: DeliveryOutcome,
) -> Option<Unrecorded> {
    let write_once = || async { record(store, id, record_.clone(), &outcome).await };
    match write_once.retry(retry::policy::attempt_record()).when(StoreError::is_transient).await {
        Ok(()) => {
            debug!(delivery_id = id, "attempt recorded");
            None
        }
        Err(StoreError::Fenced) => {
            // Several instances on PostgreSQL: the job's watch is another
            // instance's now; it sends the delivery again, same webhook-id.
            warn!(
                delivery_id = id,
                outcome = outcome.label(),
                "another instance owns this job now; the attempt is not recorded here and the owner sends the delivery again"
            );
            None
        }
        Err(e) => {
            error!(delivery_id = id, error = %e, outcome = outcome.label(), "cannot record the attempt; its outcome is kept in memory and written when the store accepts it, and the delivery is not sent again meanwhile");
            Some(Unrecorded {
                delivery_id: id,
                record: record_,
                outcome,
                tries: 1,
                retry_at: instant_after(Instant::now(), record_backoff(1)),
            })
        }
    }
}

/// The wait before writing an unrecorded outcome again after `tries` failures.
pub(super) fn record_backoff(tries: u32) -> Duration {
    RECORD_RETRY_MIN.saturating_mul(1u32 << tries.min(16)).min(RECORD_RETRY_MAX)
}

/// What an answer says of the receiver's load: a 2xx is a latency sample;
/// a 429, a 5xx or no answer at all (timeout, refused connection) is back
/// pressure; anything else (a 4xx) says nothing about load.
pub(super) fn load_signal(response: &Response) -> Signal {
    match response.status {
        None => Signal::BackPressure,
        Some(s) if (200..300).contains(&s) => Signal::Success,
        Some(s) if s == 429 || s >= 500 => Signal::BackPressure,
        Some(_) => Signal::Neutral,
    }
}

/// One attempt of one delivery, run in its own task.
pub(super) struct Attempt {
    pub(super) http: reqwest::Client,
    pub(super) metrics: Arc<Metrics>,
    pub(super) store: Arc<dyn DelivererStore>,
    pub(super) schedule: Vec<Duration>,
    pub(super) webhook: Webhook,
    pub(super) render: Render,
    /// The deliverer's clock, for the times the attempt stores.
    pub(super) clock: Arc<dyn Clock>,
    pub(super) delivery: OutboundDelivery,
}

impl Attempt {
    /// Makes the attempt and records it. A 410 Gone pauses the webhook (the
    /// delivery stays pending, due at once, for when it is resumed); a rate
    /// limit slows the webhook down; an outcome the store refuses goes back
    /// to the loop, which keeps it and writes it later.
    pub(super) async fn run(self) -> AttemptDone {
        let started_ms = self.clock.now_ms();
        let started = Instant::now();
        let id = self.delivery.id;
        let mut signal = (Duration::ZERO, Signal::Neutral);
        let (response, outcome) = match (self.render)(&self.webhook, &self.delivery.body) {
            Ok(body) => {
                let sent = Instant::now();
                let response = send(&self.http, &self.webhook, &self.delivery.msg_id, body).await;
                signal = (sent.elapsed(), load_signal(&response));
                // Only a rate-limit answer needs to know how long the
                // delivery has been trying; an unreadable answer counts as
                // "from now", which errs on the side of not giving up.
                let first = match is_rate_limit(&response) {
                    true => self.store.first_attempt_at(id).await.unwrap_or(None),
                    false => None,
                };
                let outcome = classify(
                    &response,
                    self.delivery.attempts,
                    &self.schedule,
                    self.clock.now_ms(),
                    fastrand::f64(),
                    first,
                );
                (response, outcome)
            }
            Err(e) => {
                // A body that cannot be rendered will not render next time
                // either (the stored body and the template are both fixed).
                let error = e.to_string();
                let response = Response { error: Some(error.clone()), ..Response::default() };
                (response, DeliveryOutcome::GaveUp { error })
            }
        };
        let slow_down =
            observe(&self.metrics, &self.webhook.name, &self.delivery, response.quota, &outcome, self.clock.now_ms());
        let error = outcome.error().map(str::to_owned);
        let gone = matches!(outcome, DeliveryOutcome::Paused);
        let record_ = AttemptRecord {
            attempted_at: started_ms,
            duration_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
            http_status: response.status,
            response_excerpt: response.excerpt,
            error: error.or(response.error),
        };
        let unrecorded = write_outcome(&*self.store, id, record_, outcome).await;
        AttemptDone { gone, slow_down, signal, unrecorded }
    }
}
