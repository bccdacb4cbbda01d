//! What operators change and read: the CLI's commands, the admin API, the
//! status page and push assist, as every engine implements it. Like the
//! loops' traits it is dyn-compatible and every call is a [`StoreFuture`],
//! so those callers hold an `Arc<dyn OperatorStore>` and never learn which
//! engine they run on. SQLite answers each call on a blocking thread
//! (`Store::call` around its synchronous reads); PostgreSQL on a pooled
//! connection, with the same SQL in its dialect and the same rows back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::store::ui::{Activity, DeliveryRow, DeliverySearch, JobNotification, LastError, WatchRow, WatchSearch};
use crate::store::{
    AddSummary, AttemptRecord, Backlog, DeliverySummary, PruneSummary, StoreFuture, StoredNotification, WatchQuery,
    WatchSummary,
};
use crate::vocab::{DeliveryState, NewWatch};

/// Which deliveries to list: every `Some` must match; newest first, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    /// Only this webhook's deliveries.
    pub webhook: Option<String>,
    /// Only this job's deliveries.
    pub job_id: Option<String>,
    /// Only deliveries in this state.
    pub state: Option<DeliveryState>,
    /// At most this many (bounded by the caller).
    pub limit: usize,
}

/// One delivery with the standard body of its notification and every attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryDetail {
    /// The row as `deliveries list` shows it.
    pub summary: DeliverySummary,
    /// The standard body, as stored when the transition was detected; the
    /// receiver got it rendered for its webhook's format.
    pub body: String,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
}

/// A notification as `GET /v1/events` streams it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TailNotification {
    pub id: i64,
    pub job_id: String,
    pub portal_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub at: String,
}

/// A delivery attempt's outcome as `GET /v1/events` streams it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TailAttempt {
    pub id: i64,
    pub delivery_id: i64,
    pub webhook: String,
    pub job_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// What the attempt made of its delivery: `delivered` (2xx), `failed`
    /// (the last attempt of a delivery that gave up), else `pending` (it
    /// will be tried again).
    pub state: String,
    pub http_status: Option<u16>,
    pub duration_ms: i64,
    pub error: Option<String>,
    pub at: String,
}

/// New and received notifications and attempts for `GET /v1/events`.
pub type Tail = (Vec<TailNotification>, Vec<TailAttempt>);

/// What operators change and read, as every engine implements it.
pub trait OperatorStore: Send + Sync + 'static {
    // ----- watches ------------------------------------------------------

    /// Adds watches in one transaction (see `Store::add_watches`).
    fn add_watches(&self, watches: Vec<NewWatch>) -> StoreFuture<'_, AddSummary>;
    /// Removes a watch; `false` if there was none active.
    fn remove_watch(&self, job_id: String) -> StoreFuture<'_, bool>;
    /// Watches matching `query`, in the order they were added.
    fn query_watches(&self, query: WatchQuery) -> StoreFuture<'_, Vec<WatchSummary>>;
    /// Watches per state.
    fn watch_counts(&self) -> StoreFuture<'_, BTreeMap<String, i64>>;

    // ----- deliveries ---------------------------------------------------

    /// Deliveries, newest first, optionally of one state, at most `limit`.
    fn list_deliveries(&self, state: Option<DeliveryState>, limit: usize) -> StoreFuture<'_, Vec<DeliverySummary>>;
    /// Deliveries matching `filter`, newest first.
    fn query_deliveries(&self, filter: DeliveryFilter) -> StoreFuture<'_, Vec<DeliverySummary>>;
    /// One delivery with its standard body and every attempt; `None` if there is none.
    fn delivery(&self, id: i64) -> StoreFuture<'_, Option<DeliveryDetail>>;
    /// Every notification of a job, oldest first, with its deliveries.
    fn notifications_of(&self, job_id: String) -> StoreFuture<'_, Vec<StoredNotification>>;
    /// Every attempt of a delivery, oldest first.
    fn attempts(&self, delivery_id: i64) -> StoreFuture<'_, Vec<AttemptRecord>>;
    /// Makes failed deliveries pending again (one, or all); how many.
    fn retry_failed(&self, id: Option<i64>) -> StoreFuture<'_, usize>;
    /// Makes every failed delivery of one webhook pending again; how many.
    fn retry_failed_of_webhook(&self, webhook: String) -> StoreFuture<'_, usize>;
    /// Deliveries per state.
    fn delivery_counts(&self) -> StoreFuture<'_, BTreeMap<String, i64>>;

    // ----- webhooks -----------------------------------------------------

    /// Per webhook: pending and failed deliveries, the oldest pending one's
    /// creation time (Unix ms).
    fn backlog(&self) -> StoreFuture<'_, BTreeMap<String, Backlog>>;
    /// The same figures as [`OperatorStore::backlog`], read the way the
    /// status page's overview can afford on a large outbox (SQLite reads
    /// them index by index); by default the backlog itself.
    fn webhook_backlog(&self) -> StoreFuture<'_, BTreeMap<String, Backlog>> {
        self.backlog()
    }
    /// Webhooks paused by a 410: name to (reason, since in Unix ms).
    fn webhook_pauses(&self) -> StoreFuture<'_, BTreeMap<String, (String, i64)>>;
    /// Resumes a paused webhook; `false` if it was not paused.
    fn resume_webhook(&self, webhook: String) -> StoreFuture<'_, bool>;
    /// Each webhook's adaptive concurrency as a running daemon published
    /// it, with when (Unix ms). Advisory: an engine that keeps none (this
    /// default) has no rows, and `webhooks list` shows `-`.
    fn webhook_concurrency(&self) -> StoreFuture<'_, BTreeMap<String, (u64, i64)>> {
        Box::pin(async { Ok(BTreeMap::new()) })
    }

    // ----- the event stream (`GET /v1/events`) --------------------------

    /// The newest notification and attempt ids, where a live stream starts.
    fn tail_start(&self) -> StoreFuture<'_, (i64, i64)>;
    /// Notifications after id `notification` and attempts after id
    /// `attempt`, oldest first, at most `limit` of each.
    fn tail_after(&self, notification: i64, attempt: i64, limit: usize) -> StoreFuture<'_, Tail>;

    // ----- the status page ----------------------------------------------

    /// Watches matching `search`, in the order they were added.
    fn search_watches(&self, search: WatchSearch) -> StoreFuture<'_, Vec<WatchRow>>;
    /// Deliveries matching `search`, newest first.
    fn search_deliveries(&self, search: DeliverySearch) -> StoreFuture<'_, Vec<DeliveryRow>>;
    /// Per webhook, its most recent attempt that was not a 2xx, among the
    /// newest attempts.
    fn last_errors(&self) -> StoreFuture<'_, BTreeMap<String, LastError>>;
    /// The activity of the `minutes` minutes up to the one holding `now_ms`.
    fn activity(&self, now_ms: i64, minutes: usize) -> StoreFuture<'_, Activity>;
    /// A job's first `limit` notifications after id `after`, with their
    /// deliveries and attempts.
    fn job_timeline(&self, job_id: String, after: i64, limit: usize) -> StoreFuture<'_, Vec<JobNotification>>;
    /// How many notifications a job has.
    fn notification_count(&self, job_id: String) -> StoreFuture<'_, i64>;

    // ----- upkeep and health --------------------------------------------

    /// Deletes delivered history and ended watches older than `cutoff_ms`.
    fn prune(&self, cutoff_ms: i64) -> StoreFuture<'_, PruneSummary>;
    /// Whether the database takes writes (`Err` says why not), for
    /// `/readyz` and the status page; an engine may reuse an answer for up
    /// to `max_age`.
    fn writable(&self, max_age: Duration) -> StoreFuture<'_, Result<(), String>>;
    /// What is wrong with the store itself at `now` (SQLite: its writer
    /// thread stopped, every write or call failing for longer than
    /// `max_age`); by default nothing, for an engine whose failing calls
    /// show as stale loops.
    fn problems_at(&self, now: Instant, max_age: Duration) -> Vec<String> {
        let _ = (now, max_age);
        Vec::new()
    }

    // ----- several instances --------------------------------------------

    /// Every live instance sharing the database, by name (`GET
    /// /v1/cluster`); `None` on an engine one instance has to itself (this
    /// default: SQLite).
    fn cluster(&self) -> StoreFuture<'_, Option<Vec<InstanceInfo>>> {
        Box::pin(async { Ok(None) })
    }
}

/// One live instance, for `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceInfo {
    /// Its `[cluster] instance` name.
    pub instance: String,
    /// The epoch it joined under (bumped by every join).
    pub epoch: i64,
    /// Watches it owned at its last renewal.
    pub watches: i64,
    /// When it joined (RFC 3339).
    pub started_at: String,
    /// Its last renewal (RFC 3339).
    pub last_renewal: String,
    /// When its leases end unless renewed (RFC 3339).
    pub expires_at: String,
}
