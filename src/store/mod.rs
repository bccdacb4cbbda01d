//! The store: SQLite, and the only module that runs SQL.
//!
//! It holds the watches with each job's last-seen state, and the outbox:
//! notifications, one delivery per (notification, webhook), and every delivery
//! attempt. The invariant the rest of the program leans on is that a poll's
//! new job state and the deliveries it produced are committed in one
//! transaction ([`Store::write_poll_with`]): a crash either loses both (and the
//! next poll sees the change again) or keeps both (and the deliveries are
//! sent after the restart). Every pending delivery is a row, so a restart
//! loses nothing.
//!
//! Two connections. The hot writes (each poll's read-diff-write, each
//! delivery attempt) go to one writer thread with its own connection, which
//! applies every write waiting in its own savepoint and commits them
//! together: one fsync for many polls (group commit), and nobody is told
//! "stored" before the commit. Reads and the rare writes (CLI changes,
//! pauses, pruning) use the other connection, behind a std `Mutex`: every
//! critical section is a short synchronous SQLite call made on a blocking
//! thread (see [`Store::call`]), never held across an `.await`. The CLI opens
//! its own `Store` on the same file; WAL mode and a busy timeout let all of
//! them write.

mod sqlite;

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::notification::Body;
use crate::vocab::{DeliveryState, PortalId, SeenState, WatchState};

pub use sqlite::Store;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database folder or file could not be created.
    #[error("cannot create the database at {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    /// Migrating the schema failed.
    #[error("cannot migrate the database schema: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// A query failed (locked, read-only, disk full, ...).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A row holds something this version cannot read.
    #[error("database holds an unreadable value: {0}")]
    Corrupt(String),
    /// A batched write failed (its transaction could not commit).
    #[error("database write failed: {0}")]
    Write(String),
    /// The blocking task running the query panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(String),
}

/// How many watches an add created and how many already existed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddSummary {
    /// New rows, or removed watches made active again.
    pub added: usize,
    /// Jobs already watched: left unchanged.
    pub existing: usize,
}

/// A watch as the scheduler needs it: where to poll and what it saw last.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledWatch {
    /// The job's UUID.
    pub job_id: String,
    /// The portal.
    pub portal: PortalId,
    /// Whether it should be polled.
    pub state: WatchState,
    /// Hash of the last answer's raw bytes, to skip unchanged answers.
    pub body_hash: Option<u64>,
    /// When the watch was added (Unix ms), for `max_watch_age`.
    pub created_at: i64,
}

/// Everything the diff and the notification builder need about a watch.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffContext {
    /// The portal.
    pub portal: PortalId,
    /// Webhooks named at `watch add`.
    pub webhooks: Option<Vec<String>>,
    /// Labels.
    pub labels: Map<String, Value>,
    /// `--from-now`.
    pub from_now: bool,
    /// Whether the watch is still active.
    pub state: WatchState,
    /// What was announced so far.
    pub seen: SeenState,
}

/// A filter over watches, for the CLI and the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchQuery {
    /// Only this state.
    pub state: Option<WatchState>,
    /// Only this portal (`org/endpoint`).
    pub portal_id: Option<String>,
    /// Only this job.
    pub job_id: Option<String>,
    /// Only watches added after this job's (a pagination cursor).
    pub after: Option<String>,
    /// At most this many.
    pub limit: Option<usize>,
}

/// One row of `watch list`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WatchSummary {
    pub job_id: String,
    pub portal_id: String,
    pub state: &'static str,
    pub state_reason: Option<String>,
    pub last_status: Option<String>,
    pub webhooks: Option<Vec<String>>,
    pub labels: Map<String, Value>,
    pub created_at: String,
    pub updated_at: String,
}

/// A notification to store, with its deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNotification {
    /// The notification type.
    pub kind: String,
    /// The standard body, in the parts it is stored in: a poll's
    /// notifications share their answer's part, stored once.
    pub body: Body,
    /// One delivery per matching webhook.
    pub deliveries: Vec<NewDelivery>,
}

/// A delivery to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// The webhook's name.
    pub webhook: String,
    /// The `webhook-id`, fixed for the delivery's life.
    pub msg_id: String,
}

/// What one successful poll changes, committed atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct PollCommit {
    /// The job.
    pub job_id: String,
    /// The new last-seen state.
    pub seen: SeenState,
    /// Hash of the raw answer.
    pub body_hash: u64,
    /// The watch's new state: `Active`, or `Finished`/`Failed` with a reason.
    pub end: Option<(WatchState, String)>,
    /// The notifications, in order.
    pub notifications: Vec<NewNotification>,
}

/// The result of storing a poll (see [`Store::write_poll_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Stored; this many deliveries were created.
    Stored { deliveries: usize },
    /// The watch is no longer active (removed meanwhile): nothing stored.
    WatchGone,
}

/// The first pending delivery of one (job, webhook) chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingHead {
    /// Delivery id.
    pub id: i64,
    /// The job.
    pub job_id: String,
    /// The webhook.
    pub webhook: String,
    /// When it may be attempted (Unix ms).
    pub next_attempt_at: i64,
}

/// A delivery with what is needed to send it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundDelivery {
    /// Delivery id.
    pub id: i64,
    /// The `webhook-id`.
    pub msg_id: String,
    /// The webhook's name.
    pub webhook: String,
    /// The job.
    pub job_id: String,
    /// The notification type.
    pub kind: String,
    /// The standard body.
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the transition was detected (Unix ms).
    pub detected_at: i64,
}

/// One attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// When it started (Unix ms).
    pub attempted_at: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// The receiver's status, if it answered.
    pub http_status: Option<u16>,
    /// The start of its answer (at most 4 KiB).
    pub response_excerpt: Option<String>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// What an attempt did to its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryUpdate {
    /// 2xx: done.
    Delivered,
    /// Try again at this time (Unix ms).
    RetryAt(i64),
    /// The schedule is exhausted: `failed`.
    GaveUp,
    /// The webhook is paused (410): stays pending, attempt count unchanged,
    /// due as soon as the webhook is resumed.
    Paused,
}

/// A webhook's unfinished work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Backlog {
    /// Deliveries waiting.
    pub pending: i64,
    /// Deliveries that gave up.
    pub failed: i64,
    /// When the oldest pending one was created (Unix ms).
    pub oldest_pending: Option<i64>,
}

/// A stored notification with its deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredNotification {
    /// Its id, which is also its order.
    pub id: i64,
    /// Its type.
    pub kind: String,
    /// The standard body.
    pub body: String,
    /// Detection time (Unix ms).
    pub created_at: i64,
    /// One per matching webhook.
    pub deliveries: Vec<StoredDelivery>,
}

/// A delivery as listed with its notification.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDelivery {
    /// The webhook.
    pub webhook: String,
    /// The `webhook-id`.
    pub msg_id: String,
    /// Its state.
    pub state: DeliveryState,
    /// Attempts made.
    pub attempts: u32,
}

/// What one [`Store::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneSummary {
    pub attempts: usize,
    pub deliveries: usize,
    pub notifications: usize,
    pub watches: usize,
}

/// One row of `deliveries list`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeliverySummary {
    pub id: i64,
    pub msg_id: String,
    pub job_id: String,
    pub webhook: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: &'static str,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub created_at: String,
    pub last_error: Option<String>,
}
