//! One poll of one watch: fetch, hash, parse, diff and commit, or give up;
//! and the matching of notifications to webhooks.

use std::sync::Arc;

use backon::Retryable;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::diff;
use crate::metrics::Metrics;
use crate::notification::{self, WatchContext};
use crate::retry::{self};
use crate::store::{
    CommitOutcome, Decide, DiffContext, NewDelivery, NewNotification, PollCommit, PollWrite, PollerStore, StoreError,
};
use crate::upstream::{StatusAnswer, UpstreamClient};
use crate::vocab::{NotificationKind, PortalId, SeenState, WatchState, normalize_status};

use super::*;

/// One poll of one watch, run in its own task.
pub(super) struct PollTask {
    pub(super) job_id: String,
    pub(super) portal: Arc<PortalId>,
    pub(super) last_hash: Option<u64>,
    pub(super) config: Arc<Config>,
    pub(super) store: Arc<dyn PollerStore>,
    pub(super) client: UpstreamClient,
    pub(super) metrics: Arc<Metrics>,
}

impl PollTask {
    pub(super) async fn poll(self) -> PollOutcome {
        let Some(org) = self.config.orgs.get(&self.portal.org) else {
            return PollOutcome::NoCredentials;
        };
        let started = Instant::now();
        let fetched = self.client.fetch_status(&self.portal, &self.job_id, &org.api_key).await;
        self.metrics.poll_duration(started.elapsed().as_secs_f64());
        let body = match fetched {
            Ok(body) => body,
            Err(e) => return PollOutcome::Failed(e),
        };
        let hash = body_hash(&body);
        if self.last_hash == Some(hash) {
            debug!("unchanged");
            return PollOutcome::Unchanged;
        }
        let answer = match crate::upstream::parse_status(&body) {
            Ok(answer) => Arc::new(answer),
            Err(e) => {
                warn!(job_id = %self.job_id, error = %e, excerpt = %crate::upstream::excerpt(&body, 200), "malformed status answer; last-seen state kept");
                return PollOutcome::Failed(e);
            }
        };
        // Store faults (locked, disk full) are retried briefly here; if they
        // last, the outcome says so and the whole poll is redone later, since
        // nothing was acknowledged.
        let commit = || async { self.diff_and_commit(Arc::clone(&answer), hash).await };
        let result = commit
            .retry(retry::policy::poll_commit())
            .when(StoreError::is_transient)
            .notify(|e, wait| warn!(job_id = %self.job_id, error = %e, retry_in_ms = wait.as_millis() as u64, "store write failed; retrying"))
            .await;
        match result {
            Ok(outcome) => outcome,
            Err(e) => PollOutcome::StoreFailed(e),
        }
    }

    /// Gives up on the watch: stores `watch.failed` and marks it failed.
    pub(super) async fn give_up(self, reason: GiveUp) -> PollOutcome {
        let job_id = self.job_id.clone();
        let ctx = match self.store.diff_context(job_id).await {
            Ok(Some(ctx)) if ctx.state == WatchState::Active => ctx,
            Ok(_) => return PollOutcome::Gone,
            Err(e) => return PollOutcome::StoreFailed(e),
        };
        let portal_id = ctx.portal.to_string();
        let watch = WatchContext { job_id: &self.job_id, portal_id: &portal_id, labels: &ctx.labels };
        let n = notification::watch_failed(
            watch,
            reason.label(),
            ctx.seen.status.as_deref(),
            &notification::now_timestamp(),
        );
        let notification = NewNotification {
            deliveries: deliveries_for(
                &self.config,
                &self.metrics,
                &n.kind,
                &portal_id,
                ctx.webhooks.as_deref(),
                &ctx.labels,
            ),
            kind: n.kind,
            body: n.body,
        };
        match self.store.fail_watch(self.job_id.clone(), reason.label().to_owned(), notification).await {
            Ok(CommitOutcome::WatchGone) => PollOutcome::Gone,
            Ok(CommitOutcome::Stored { deliveries }) => {
                error!(job_id = %self.job_id, reason = reason.label(), "gave up on the watch; watch.failed stored");
                self.metrics.watch_failed(reason.label());
                self.metrics.notification("watch.failed");
                PollOutcome::GaveUp { deliveries }
            }
            Err(e) => PollOutcome::StoreFailed(e),
        }
    }

    /// Loads the last-seen state, diffs, and commits the result atomically.
    async fn diff_and_commit(&self, answer: Arc<StatusAnswer>, hash: u64) -> Result<PollOutcome, StoreError> {
        let (config, job_id) = (Arc::clone(&self.config), self.job_id.clone());
        let metrics = Arc::clone(&self.metrics);
        // Runs inside the store's transaction, between reading the
        // last-seen state and writing the new one (PollerStore::commit_poll).
        let decide: Decide = Box::new(move |ctx: &DiffContext| {
            let diff = diff::diff(&ctx.seen, &answer, ctx.from_now);
            if let Some(anomaly) = &diff.anomaly {
                warn!(
                    job_id = %job_id,
                    ?anomaly,
                    events = answer.events.len(),
                    "event list did not simply grow; announcing only unseen entries"
                );
            }
            let portal_id = ctx.portal.to_string();
            let watch = WatchContext { job_id: &job_id, portal_id: &portal_id, labels: &ctx.labels };
            let timestamp = notification::now_timestamp();
            let notifications =
                notification::build(&diff.transitions, &answer, ctx.seen.status.as_deref(), watch, &timestamp);
            // Whatever the diff found, a job now in a terminal status is done
            // once this commit holds its notifications.
            let terminal = config.is_terminal(&normalize_status(&answer.status));
            let notifications: Vec<NewNotification> = notifications
                .into_iter()
                .map(|n| NewNotification {
                    deliveries: deliveries_for(
                        &config,
                        &metrics,
                        &n.kind,
                        &portal_id,
                        ctx.webhooks.as_deref(),
                        &ctx.labels,
                    ),
                    kind: n.kind,
                    body: n.body,
                })
                .collect();
            Some(PollCommit {
                job_id: job_id.clone(),
                seen: diff.state,
                body_hash: hash,
                end: terminal.then(|| (WatchState::Finished, format!("status {}", answer.status))),
                notifications,
            })
        });
        match self.store.commit_poll(self.job_id.clone(), decide).await? {
            PollWrite::Skipped | PollWrite::Gone => Ok(PollOutcome::Gone),
            PollWrite::Stored { before, commit, deliveries } => {
                for n in &commit.notifications {
                    self.metrics.notification(&n.kind.to_string());
                }
                let count = commit.notifications.len();
                let status_of = |seen: &SeenState| seen.status.as_deref().map(normalize_status);
                if status_of(&before.seen) != status_of(&commit.seen) {
                    let status = commit.seen.status.as_deref().unwrap_or_default();
                    info!(job_id = %self.job_id, %status, notifications = count, deliveries, "status changed");
                } else if count > 0 {
                    debug!(job_id = %self.job_id, notifications = count, deliveries, "new events");
                }
                Ok(PollOutcome::Changed {
                    notifications: count,
                    terminal: commit.end.is_some(),
                    body_hash: hash,
                    deliveries,
                })
            }
        }
    }
}

/// One new delivery per webhook that accepts a notification of `kind` for
/// this watch: the one place notifications are matched to webhooks.
///
/// A watch that names a webhook the config no longer has (renamed or
/// removed by a reload) still gets a delivery for that name, of every kind
/// since its `types` filter is unknown: the row waits, pending, and the
/// deliverer (which only looks at webhooks in the config) leaves it alone
/// until a webhook of that name exists again, then delivers the backlog in
/// order. Dropping it would lose notifications for good with no sign. Each
/// such delivery is counted (`unknown_webhook`), and the first one per name
/// is logged.
pub(super) fn deliveries_for(
    config: &Config,
    metrics: &Metrics,
    kind: &NotificationKind,
    portal_id: &str,
    named: Option<&[String]>,
    labels: &serde_json::Map<String, serde_json::Value>,
) -> Vec<NewDelivery> {
    let kind = kind.to_string();
    let kind = kind.as_str();
    let mut deliveries: Vec<NewDelivery> = config
        .webhooks
        .iter()
        .filter(|w| w.accepts(kind, portal_id, named, labels))
        .map(|w| NewDelivery { webhook: w.name.clone(), msg_id: new_msg_id() })
        .collect();
    for name in named.unwrap_or_default() {
        if config.webhooks.iter().any(|w| &w.name == name) || deliveries.iter().any(|d| &d.webhook == name) {
            continue;
        }
        if metrics.delivery_fault(name, "unknown_webhook") == 0 {
            warn!(webhook = %name, "a watch names a webhook that is not in the config; its deliveries are kept pending until a webhook of that name is configured again");
        }
        deliveries.push(NewDelivery { webhook: name.clone(), msg_id: new_msg_id() });
    }
    deliveries
}

/// A new `webhook-id`: `msg_` and 32 random hex digits, unique per delivery.
pub fn new_msg_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

/// The hash that recognises an unchanged answer from its raw bytes: foldhash
/// with a fixed seed, several times faster than std's SipHash on a 5 KB body
/// (no secret key is needed: it only compares a job's answer with its own
/// last one). Kept in the database too; if a new foldhash version ever
/// changed its output, the only effect would be one extra parse and diff per
/// watch, which finds nothing new.
pub(super) fn body_hash(body: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::with_seed(0x6461_7269_2d72_656c).hash_one(body)
}
