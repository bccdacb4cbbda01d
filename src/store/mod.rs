//! The store: SQLite, and the only module that runs SQL.
//!
//! It holds the watches with each job's last-seen state, and the outbox:
//! notifications, one delivery per (notification, webhook), and every delivery
//! attempt. The invariant the rest of the program leans on is that a poll's
//! new job state and the deliveries it produced are committed in one
//! transaction ([`PollerStore::commit_poll`]): a crash either loses both (and the
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

pub mod copy;
mod operator;
pub mod postgres;
mod sqlite;
pub mod ui;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::notification::Body;
use crate::vocab::{DeliveryState, NotificationKind, PortalId, SeenState, WatchState};

pub use operator::{DeliveryDetail, DeliveryFilter, InstanceInfo, OperatorStore, TailAttempt, TailNotification};
pub use postgres::Postgres;
pub use postgres::copy::PostgresCopy;
pub use sqlite::copy::SqliteCopy;
pub use sqlite::running::{RunningLock, lock_path};
pub use sqlite::{Sqlite, Store};

/// A store failure. The engine's own error is kept as the source (and
/// repeated in the message, for logs; `cli::error_text` prints each cause once).
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
    /// A batched write could not begin or commit; every write of the batch
    /// gets this same error.
    #[error("database write failed: {0}")]
    Commit(#[source] Arc<rusqlite::Error>),
    /// The writer thread could not be started.
    #[error("cannot start the database writer thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The writer thread has stopped (it crashed, or the store is closing).
    #[error("the database writer thread has stopped")]
    WriterGone,
    /// The blocking task running the query panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A write panicked; its savepoint was rolled back.
    #[error("a database write panicked: {0}")]
    Panicked(String),
    /// A PostgreSQL query or connection failed; the server's own message
    /// (with its detail) is repeated, since the driver's says only "db error".
    #[error("database error: {}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool in time.
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// This instance no longer owns the watch (its lease on the PostgreSQL
    /// database expired, or it handed the watch over): the write was
    /// refused, since another instance works on it now.
    #[error("this instance no longer holds the lease of this watch: another instance works on it")]
    Fenced,
    /// The PostgreSQL URL or its TLS setup is unusable (the URL itself is
    /// never repeated: it may hold a password).
    #[error("{0}")]
    Url(String),
    /// Another process holds the SQLite database's running lock (see
    /// [`RunningLock`]): a daemon, or a `db copy`, named as it said.
    #[error("the database is in use by {0}")]
    InUse(String),
}

/// A PostgreSQL error as one line: the server's message when it sent one.
fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

impl StoreError {
    /// Whether trying again later may succeed (a lock, a full disk, a
    /// writer that restarts); a corrupt row reads the same next time.
    pub fn is_transient(&self) -> bool {
        !matches!(self, StoreError::Corrupt(_) | StoreError::Url(_) | StoreError::Fenced)
    }
}

/// A store call in flight: boxed, so the storage traits can be used as
/// `dyn` (the poller and the deliverer do not know the engine).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

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
    /// Whether this instance owns the watch's work: always on an engine
    /// that one instance has to itself (SQLite); on PostgreSQL with several
    /// instances, only the watches it holds the lease of. The poller polls
    /// only what it owns, and drops a watch another instance took.
    pub owned: bool,
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
    pub kind: NotificationKind,
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

/// The result of storing a poll (see [`PollerStore::commit_poll`]).
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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

/// The message a live webhook keeps for a job: posted by the job's first
/// notification, edited by the later ones. Kept with the deliveries, so a
/// restart edits the same message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMessage {
    /// Discord's message id, or Slack's message `ts`.
    pub id: String,
    /// Slack's channel id the message is in (`chat.postMessage` answers it);
    /// `None` for Discord, whose webhook URL names the channel.
    pub channel: Option<String>,
}

/// What one delivery attempt came to: decided by `deliver::classify`,
/// recorded by [`DelivererStore::record_attempt`]; the one type from the
/// classifier to the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// 2xx: `delivered`.
    Delivered { status: u16 },
    /// Non-2xx or transport failure: pending, counted, tried again at
    /// `at_ms` (Unix ms).
    RetryAt { at_ms: i64, error: String },
    /// The schedule is exhausted (or the body cannot be rendered): `failed`.
    GaveUp { error: String },
    /// 410 Gone: the webhook is paused; the delivery stays pending, its
    /// attempt count unchanged, due as soon as the webhook is resumed.
    Paused,
    /// 429, or 503 with `Retry-After`: the receiver asks to slow down. The
    /// delivery waits `wait` (the bounded `Retry-After`) and is tried again
    /// at `at_ms` without spending a retry; its webhook waits too.
    RateLimited { at_ms: i64, wait: Duration, error: String },
}

impl DeliveryOutcome {
    /// The label under which the outcome is counted.
    pub fn label(&self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered { .. } => "delivered",
            DeliveryOutcome::RetryAt { .. } => "retry",
            DeliveryOutcome::GaveUp { .. } => "gave_up",
            DeliveryOutcome::Paused => "gone",
            DeliveryOutcome::RateLimited { .. } => "rate_limited",
        }
    }

    /// The error this outcome stores with its attempt, if any.
    pub fn error(&self) -> Option<&str> {
        match self {
            DeliveryOutcome::Delivered { .. } => None,
            DeliveryOutcome::RetryAt { error, .. }
            | DeliveryOutcome::GaveUp { error }
            | DeliveryOutcome::RateLimited { error, .. } => Some(error),
            DeliveryOutcome::Paused => Some("HTTP 410 Gone: webhook paused"),
        }
    }
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

/// What the poller's store call read and wrote.
#[derive(Debug)]
pub enum PollWrite {
    /// The watch was not active when read, or the decision stored nothing.
    Skipped,
    /// The watch stopped being active (removed) before the write.
    Gone,
    /// Stored in one transaction: the state the decision read (`before`),
    /// what it wrote (`commit`) and how many deliveries that made.
    Stored { before: Box<DiffContext>, commit: Box<PollCommit>, deliveries: usize },
}

/// A poll's decision: given the last-seen state, what to write (`None`:
/// nothing). It runs inside the store's transaction, between the read and
/// the write, so no other write to the watch comes between; it must not
/// block.
pub type Decide = Box<dyn FnOnce(&DiffContext) -> Option<PollCommit> + Send>;

/// The active watches and the revision they were read at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schedule {
    /// The watch revision: every add, removal and end bumps it.
    pub rev: i64,
    /// The watches read: all active ones, or those changed since a revision.
    pub watches: Vec<ScheduledWatch>,
}

/// What the poller needs from storage. Every engine implements it; the
/// poller never learns which one it runs on.
pub trait PollerStore: Send + Sync + 'static {
    /// Every active watch, and the revision read.
    fn schedule(&self) -> StoreFuture<'_, Schedule>;
    /// Watches added, ended or removed since `rev`, as they are now, and
    /// the new revision.
    fn schedule_since(&self, rev: i64) -> StoreFuture<'_, Schedule>;
    /// A watch's last-seen state, or `None` if there is no such watch.
    fn diff_context(&self, job_id: String) -> StoreFuture<'_, Option<DiffContext>>;
    /// Reads the watch's last-seen state, runs `decide` on it and writes
    /// what it returns, atomically; skipped if the watch is not active.
    fn commit_poll(&self, job_id: String, decide: Decide) -> StoreFuture<'_, PollWrite>;
    /// Gives up on an active watch: `failed`, with its `watch.failed`
    /// notification, in one transaction.
    fn fail_watch(
        &self,
        job_id: String,
        reason: String,
        notification: NewNotification,
    ) -> StoreFuture<'_, CommitOutcome>;
}

/// What the deliverer needs from storage. Every engine implements it.
pub trait DelivererStore: Send + Sync + 'static {
    /// Webhooks paused by a 410: name to (reason, since in Unix ms).
    fn paused_webhooks(&self) -> StoreFuture<'_, BTreeMap<String, (String, i64)>>;
    /// Pauses a webhook (a 410), until `webhooks resume`.
    fn pause_webhook(&self, webhook: String, reason: String) -> StoreFuture<'_, ()>;
    /// The first pending delivery of each of `webhook`'s chains, due or not,
    /// soonest due first, at most `limit`.
    fn pending_heads(&self, webhook: String, limit: usize) -> StoreFuture<'_, Vec<PendingHead>>;
    /// The deliveries `ids` with their bodies, as sent.
    fn outbound(&self, ids: Vec<i64>) -> StoreFuture<'_, Vec<OutboundDelivery>>;
    /// When a delivery was first attempted (Unix ms), if it was.
    fn first_attempt_at(&self, id: i64) -> StoreFuture<'_, Option<i64>>;
    /// Records an attempt and moves its delivery on as `outcome` says.
    fn record_attempt(&self, id: i64, attempt: AttemptRecord, outcome: DeliveryOutcome) -> StoreFuture<'_, ()>;
    /// The live message of (job, webhook), if one was posted.
    fn live_message(&self, job_id: String, webhook: String) -> StoreFuture<'_, Option<LiveMessage>>;
    /// Keeps the live message of (job, webhook), replacing any before (a
    /// message deleted in the chat is posted again).
    fn save_live_message(&self, job_id: String, webhook: String, message: LiveMessage) -> StoreFuture<'_, ()>;
    /// The pending deliveries of one (job, webhook) chain, oldest first, at
    /// most `limit`, with their bodies: what one edit of a live message may
    /// cover.
    fn pending_chain(&self, job_id: String, webhook: String, limit: usize) -> StoreFuture<'_, Vec<OutboundDelivery>>;
    /// The standard bodies of the last `limit` `job.event` notifications of
    /// the chain up to delivery `up_to` (included), oldest first, whatever
    /// their state: the recent events a live message lists.
    fn recent_events(&self, job_id: String, webhook: String, up_to: i64, limit: usize) -> StoreFuture<'_, Vec<String>>;
    /// Whether this instance may still act on the work it owns: `false`
    /// once its leases may have lapsed on this instance's own monotonic
    /// clock (several instances on PostgreSQL: a freeze, or renewals that
    /// fail), checked just before sends start. An engine one instance has
    /// to itself (this default) always may.
    fn still_owner(&self) -> bool {
        true
    }
    /// Keeps each webhook's current adaptive concurrency where other
    /// processes can read it (`webhooks list`, the status page), with the
    /// time it was written. Advisory: an engine that keeps nothing (this
    /// default) only leaves the column empty.
    fn publish_concurrency(&self, limits: Vec<(String, usize)>) -> StoreFuture<'_, ()> {
        let _ = limits;
        Box::pin(async { Ok(()) })
    }
}

/// Every role at once: what an engine is.
pub trait Storage: PollerStore + DelivererStore + OperatorStore {}

impl<T: PollerStore + DelivererStore + OperatorStore> Storage for T {}
