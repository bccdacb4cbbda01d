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

use std::any::Any;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior, params};
use rusqlite_migration::{M, Migrations};

mod ops;
pub use ops::{DeliveryDetail, DeliveryFilter, TailAttempt, TailNotification};
use serde_json::{Map, Value};

use crate::diff::SeenState;
use crate::notification::{self, Body};
use crate::upstream::PortalId;

/// Versioned schema migrations, applied in order on open. Append only: a
/// released migration is never edited.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
-- Bumped by every change to a watch's row made outside the poller (add,
-- import, rm), so the daemon notices such changes with one cheap query.
INSERT INTO meta (key, value) VALUES ('watch_rev', 0);

CREATE TABLE watches (
    job_id        TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL,
    endpoint_name TEXT NOT NULL,
    webhooks      TEXT,              -- JSON list of webhook names; NULL: by portal patterns
    labels        TEXT NOT NULL,     -- JSON object
    from_now      INTEGER NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('active', 'finished', 'failed', 'removed')),
    state_reason  TEXT,
    rev           INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,  -- Unix milliseconds
    updated_at    INTEGER NOT NULL,
    last_status   TEXT,              -- NULL until the first successful poll
    event_fps     BLOB NOT NULL DEFAULT x'',  -- 8 bytes per announced event
    body_hash     INTEGER            -- hash of the last answer's raw bytes
) STRICT;
CREATE INDEX watches_rev ON watches (rev);
CREATE INDEX watches_state ON watches (state);

CREATE TABLE notifications (
    id         INTEGER PRIMARY KEY,
    job_id     TEXT NOT NULL,
    type       TEXT NOT NULL,
    body       TEXT NOT NULL,        -- the standard body, fixed at detection
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX notifications_job ON notifications (job_id, id);

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,  -- also the order within (job, webhook)
    notification_id INTEGER NOT NULL REFERENCES notifications (id),
    job_id          TEXT NOT NULL,
    webhook         TEXT NOT NULL,
    msg_id          TEXT NOT NULL UNIQUE, -- the webhook-id header
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER,
    last_error      TEXT
) STRICT;
CREATE INDEX deliveries_chain ON deliveries (job_id, webhook, state, id);
CREATE INDEX deliveries_pending ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_state ON deliveries (state, id);

CREATE TABLE attempts (
    id               INTEGER PRIMARY KEY,
    delivery_id      INTEGER NOT NULL REFERENCES deliveries (id),
    attempted_at     INTEGER NOT NULL,
    duration_ms      INTEGER NOT NULL,
    http_status      INTEGER,
    response_excerpt TEXT,
    error            TEXT
) STRICT;
CREATE INDEX attempts_delivery ON attempts (delivery_id);
"#,
    r#"
-- Webhooks paused by a 410 Gone, until `webhooks resume`.
CREATE TABLE webhook_pauses (
    webhook   TEXT PRIMARY KEY,
    reason    TEXT NOT NULL,
    paused_at INTEGER NOT NULL
) STRICT;
-- The deliverer asks for due heads one webhook at a time, so that one
-- webhook's backlog never hides another's.
CREATE INDEX deliveries_pending_by_webhook ON deliveries (webhook, next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_finished ON deliveries (finished_at) WHERE state = 'delivered';
"#,
    r#"
-- Pruning and `notifications_of` look deliveries up by notification: without
-- this index each lookup scanned every delivery, so pruning grew with history.
CREATE INDEX deliveries_notification ON deliveries (notification_id);
-- Pruning walks old notifications in (created_at, id) order, in batches.
CREATE INDEX notifications_created ON notifications (created_at, id);
-- The part of a poll's answer that all its notifications share (everything
-- in `data` but `event`), stored once per poll instead of once per
-- notification: a first poll with 50 events no longer stores the answer 50
-- times. `before` and `after` are the JSON members sorting before and after
-- `event`, without braces.
CREATE TABLE answers (
    id     INTEGER PRIMARY KEY,
    before TEXT NOT NULL,
    after  TEXT NOT NULL
) STRICT;
-- With an answer, `body` is the notification's own head (type, timestamp,
-- the opening of `data`) and `event` its `"event":...` member, if any; the
-- standard body is composed from the parts when it is read for sending.
-- Without (every row stored before this migration, and `watch.failed`),
-- `body` is the whole standard body, as before.
ALTER TABLE notifications ADD COLUMN answer_id INTEGER REFERENCES answers (id);
ALTER TABLE notifications ADD COLUMN event TEXT;
CREATE INDEX notifications_answer ON notifications (answer_id) WHERE answer_id IS NOT NULL;
"#,
];

/// A store failure. SQLite's own error is kept as the source.
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

/// The state of a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchState {
    /// Being polled.
    Active,
    /// Reached a terminal status; its notifications are stored.
    Finished,
    /// The relay gave up on it (`watch.failed` was stored).
    Failed,
    /// Removed by `watch rm`.
    Removed,
}

impl WatchState {
    /// The name stored in the database and shown by `watch list`.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchState::Active => "active",
            WatchState::Finished => "finished",
            WatchState::Failed => "failed",
            WatchState::Removed => "removed",
        }
    }

    /// Parses a state name, as stored or given to a filter.
    pub fn from_name(s: &str) -> Option<WatchState> {
        WatchState::parse(s).ok()
    }

    fn parse(s: &str) -> Result<WatchState, StoreError> {
        Ok(match s {
            "active" => WatchState::Active,
            "finished" => WatchState::Finished,
            "failed" => WatchState::Failed,
            "removed" => WatchState::Removed,
            other => return Err(StoreError::Corrupt(format!("watch state {other:?}"))),
        })
    }
}

/// A watch to add.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWatch {
    /// The job's UUID, lower-case hyphenated.
    pub job_id: String,
    /// The portal the job runs on.
    pub portal: PortalId,
    /// Webhooks named on the command line; `None` means by portal patterns.
    pub webhooks: Option<Vec<String>>,
    /// Labels passed through to every notification.
    pub labels: BTreeMap<String, String>,
    /// Whether the first poll's answer counts as already known.
    pub from_now: bool,
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

/// The state of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its turn or its next attempt.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// Every retry failed; kept for `deliveries retry`.
    Failed,
}

impl DeliveryState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    /// Parses a stored or command-line name.
    pub fn parse(s: &str) -> Option<DeliveryState> {
        match s {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "failed" => Some(DeliveryState::Failed),
            _ => None,
        }
    }
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

/// The database.
pub struct Store {
    /// For reads and the rare writes (CLI changes, pauses, pruning).
    conn: Mutex<Connection>,
    /// The file, for the writer's own connection.
    path: PathBuf,
    /// The batching writer's queue, once started; see [`Store::write_poll_with`].
    writer: Mutex<Option<std::sync::mpsc::Sender<WriteOp>>>,
    /// Write transactions committed through this handle, for the benchmark.
    commits: Arc<AtomicU64>,
    /// How the writer thread and the store calls are faring, for `/readyz`
    /// and the watchdog; shared with the writer thread.
    vitals: Arc<Vitals>,
}

/// What the store knows of its own health (see [`Store::problems_at`]).
/// Times are on the monotonic clock, as milliseconds since `origin` plus
/// one, so that 0 means "never" and a wall-clock jump changes nothing.
#[derive(Debug)]
struct Vitals {
    origin: Instant,
    /// The writer thread was started, and has not ended since. A drop guard
    /// in the thread clears it, so a panic is seen too.
    writer_started: AtomicBool,
    writer_alive: AtomicBool,
    /// The writer is waiting for the write lock: the pruner lets it in
    /// before its next batch.
    writer_waiting: AtomicBool,
    /// The writer's last successful write.
    last_write: AtomicU64,
    /// Since when every write has failed (0: the last one succeeded).
    writes_failing_since: AtomicU64,
    /// Since when every [`Store::call`] has failed (0: the last one succeeded).
    calls_failing_since: AtomicU64,
    /// The last write check made for `/readyz`: when, and what it found.
    checked: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Vitals {
    fn new() -> Vitals {
        Vitals {
            origin: Instant::now(),
            writer_started: AtomicBool::new(false),
            writer_alive: AtomicBool::new(false),
            writer_waiting: AtomicBool::new(false),
            last_write: AtomicU64::new(0),
            writes_failing_since: AtomicU64::new(0),
            calls_failing_since: AtomicU64::new(0),
            checked: Mutex::new(None),
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64 + 1
    }

    /// Records the outcome of one write or call on `failing_since`.
    fn record(&self, failing_since: &AtomicU64, ok: bool) {
        let now = self.stamp(Instant::now());
        if ok {
            failing_since.store(0, Ordering::Relaxed);
        } else {
            // Only the first failure of a run sets the start.
            let _ = failing_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

/// Marks the writer thread dead when it ends, however it ends.
struct WriterAlive(Arc<Vitals>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.writer_alive.store(false, Ordering::Relaxed);
        self.0.writer_waiting.store(false, Ordering::Relaxed);
    }
}

/// Ids read by one statement of [`Store::outbound_many`] at most.
const OUTBOUND_CHUNK: usize = 500;

/// Rows one pruning transaction handles at most: each batch holds the
/// write lock for milliseconds, so polls and attempts get in between.
const PRUNE_BATCH: usize = 1000;
/// How long the pruner waits at most, between batches, for a writer that
/// waits for the lock to get it.
const PRUNE_YIELD: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// How long a connection waits for another one's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection with the relay's settings.
fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk before anyone is told it happened, so a
    // delivery never goes out for a notification that power loss could undo
    // (which would come back with a new webhook-id). Group commit in the
    // writer keeps this to one fsync for many polls.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as i64
}

fn ms_to_rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

impl Store {
    /// Opens (creating if missing) the database at `path`: the folder is
    /// created 0700 and the file 0600, WAL is enabled and migrations run.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let create = |source| StoreError::Create { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(create)?;
        }
        if !path.exists() {
            fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path).map_err(create)?;
        }
        let mut conn = open_connection(path)?;
        Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect()).to_latest(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            writer: Mutex::new(None),
            commits: Arc::new(AtomicU64::new(0)),
            vitals: Arc::new(Vitals::new()),
        })
    }

    /// Write transactions committed through this handle so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Runs `f` on a blocking thread, so SQLite never stalls the runtime.
    pub async fn call<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = Arc::clone(self);
        let result =
            tokio::task::spawn_blocking(move || f(&store)).await.map_err(|e| StoreError::Task(e.to_string()))?;
        // A loop whose every store call fails makes no progress, even though
        // it keeps turning (and beating): readiness and the watchdog see it.
        self.vitals.record(&self.vitals.calls_failing_since, result.is_ok());
        result
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (SQLite
        // rolls back an unfinished transaction), so poisoning is ignored.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- watches ------------------------------------------------------

    /// Adds watches in one transaction. A job already watched (active,
    /// finished or failed) is left unchanged; a removed one becomes active
    /// again with its last-seen state, so nothing is announced twice, but
    /// with the new webhooks and labels and a fresh age. Its answer hash is
    /// forgotten: if the job ended meanwhile (or before the removal), Dari
    /// answers the same bytes as at the last poll, and a kept hash would
    /// skip them as unchanged until `max_watch_age`; without it the first
    /// poll parses the answer once and a terminal status ends the watch.
    pub fn add_watches(&self, watches: &[NewWatch]) -> Result<AddSummary, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let rev = bump_rev(&tx)?;
        let now = now_ms();
        let mut summary = AddSummary::default();
        {
            let mut insert = tx.prepare(
                "INSERT INTO watches (job_id, org_id, endpoint_name, webhooks, labels, from_now, state, rev, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'active', ?7, ?8, ?8)
                 ON CONFLICT (job_id) DO UPDATE SET state = 'active', state_reason = NULL, rev = ?7, updated_at = ?8,
                     created_at = ?8, webhooks = excluded.webhooks, labels = excluded.labels, body_hash = NULL
                 WHERE state = 'removed'",
            )?;
            for w in watches {
                let webhooks = w.webhooks.as_ref().map(|names| serde_json::to_string(names).expect("names serialise"));
                let labels = serde_json::to_string(&w.labels).expect("labels serialise");
                let changed = insert.execute(params![
                    w.job_id,
                    w.portal.org,
                    w.portal.endpoint,
                    webhooks,
                    labels,
                    w.from_now,
                    rev,
                    now
                ])?;
                if changed == 1 {
                    summary.added += 1;
                } else {
                    summary.existing += 1;
                }
            }
        }
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(summary)
    }

    /// Marks a watch removed. Returns `false` when no such job is watched.
    /// Its pending deliveries are still sent: they are transitions already seen.
    pub fn remove_watch(&self, job_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let rev = bump_rev(&tx)?;
        let changed = tx.execute(
            "UPDATE watches SET state = 'removed', state_reason = 'watch rm', rev = ?2, updated_at = ?3
             WHERE job_id = ?1 AND state != 'removed'",
            params![job_id, rev, now_ms()],
        )?;
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(changed == 1)
    }

    /// Watches for `watch list`: active ones, or all with `all`.
    pub fn list_watches(&self, all: bool) -> Result<Vec<WatchSummary>, StoreError> {
        let state = (!all).then_some(WatchState::Active);
        self.query_watches(&WatchQuery { state, ..WatchQuery::default() })
    }

    /// Watches matching `query`, in the order they were added.
    pub fn query_watches(&self, query: &WatchQuery) -> Result<Vec<WatchSummary>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT job_id, org_id, endpoint_name, state, state_reason, last_status, webhooks, labels, created_at, updated_at
             FROM watches
             WHERE (?1 IS NULL OR state = ?1)
               AND (?2 IS NULL OR org_id || '/' || endpoint_name = ?2)
               AND (?3 IS NULL OR job_id = ?3)
               AND (?4 IS NULL OR rowid > (SELECT rowid FROM watches WHERE job_id = ?4))
             ORDER BY rowid LIMIT ?5",
        )?;
        let limit = query.limit.map_or(-1, sql_limit);
        let bind = params![query.state.map(WatchState::as_str), query.portal_id, query.job_id, query.after, limit];
        let rows = stmt.query_map(bind, |r| {
            Ok((
                r.get::<_, String>(0)?,
                format!("{}/{}", r.get::<_, String>(1)?, r.get::<_, String>(2)?),
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, i64>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, portal_id, state, state_reason, last_status, webhooks, labels, created, updated) = row?;
            out.push(WatchSummary {
                job_id,
                portal_id,
                state: WatchState::parse(&state)?.as_str(),
                state_reason,
                last_status,
                webhooks: parse_webhooks(webhooks.as_deref())?,
                labels: parse_labels(&labels)?,
                created_at: ms_to_rfc3339(created),
                updated_at: ms_to_rfc3339(updated),
            });
        }
        Ok(out)
    }

    /// Watches per state.
    pub fn watch_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM watches GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Fails unless the database accepts a write (tried, then rolled back).
    /// It takes the write lock: [`Store::writable`] is the probe's version.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        try_write(&mut self.conn())
    }

    /// Whether the database accepts writes, for `/readyz`, without taking
    /// the write lock on every probe: a write by the writer within `max_age`
    /// (with none failing since) answers it; otherwise one real check
    /// ([`Store::check_writable`], waiting at most a moment for the lock) is
    /// made and its answer reused for `max_age`. A lock held by another
    /// connection means someone is writing to the file, not that it refuses
    /// writes: that counts as writable.
    pub fn writable(&self, max_age: Duration) -> Result<(), String> {
        let now = Instant::now();
        let v = &self.vitals;
        let last = v.last_write.load(Ordering::Relaxed);
        let fresh = (max_age.as_millis() as u64).max(1);
        if last != 0 && v.stamp(now).saturating_sub(last) < fresh && v.writes_failing_since.load(Ordering::Relaxed) == 0
        {
            return Ok(());
        }
        let mut checked = v.checked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, result)) = checked.as_ref().filter(|(at, _)| now.saturating_duration_since(*at) < max_age) {
            return result.clone();
        }
        let result = {
            let mut conn = self.conn();
            let _ = conn.busy_timeout(Duration::from_millis(200));
            let result = match try_write(&mut conn) {
                Err(StoreError::Sqlite(e)) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => Ok(()),
                other => other.map_err(|e| e.to_string()),
            };
            let _ = conn.busy_timeout(BUSY_TIMEOUT);
            result
        };
        *checked = Some((now, result.clone()));
        result
    }

    /// What is wrong with the store as the loops use it, at `now`: the
    /// writer thread has stopped, or every write or every store call has
    /// failed for longer than `max_age`. Empty when all is well. Monotonic:
    /// a wall-clock jump cannot change the answer.
    pub fn problems_at(&self, now: Instant, max_age: Duration) -> Vec<String> {
        let v = &self.vitals;
        let mut out = Vec::new();
        if v.writer_started.load(Ordering::Relaxed) && !v.writer_alive.load(Ordering::Relaxed) {
            out.push("the database writer thread has stopped".to_owned());
        }
        let now = v.stamp(now);
        for (since, what) in [(&v.writes_failing_since, "write"), (&v.calls_failing_since, "call")] {
            let since = since.load(Ordering::Relaxed);
            if since != 0 && now.saturating_sub(since) > max_age.as_millis() as u64 {
                out.push(format!("every database {what} failed for the last {}s", (now - since) / 1000));
            }
        }
        out
    }

    /// Stops the writer thread, as a crash of it would. For tests of
    /// readiness and the watchdog.
    #[doc(hidden)]
    pub fn stop_writer_for_test(&self) -> Result<(), StoreError> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.writer()?.send(WriteOp::Stop(reply)).map_err(|_| writer_gone())?;
        answer.recv().map_err(|_| writer_gone())?;
        // The thread ends right after answering; wait until it has.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.vitals.writer_alive.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// The current watch revision; see the `meta` table.
    pub fn watch_rev(&self) -> Result<i64, StoreError> {
        Ok(self.conn().query_row("SELECT value FROM meta WHERE key = 'watch_rev'", [], |r| r.get(0))?)
    }

    /// Every active watch, for the scheduler at start.
    pub fn active_watches(&self) -> Result<Vec<ScheduledWatch>, StoreError> {
        self.scheduled("WHERE state = 'active'", 0)
    }

    /// Watches changed by the CLI since revision `rev` (any state), so the
    /// scheduler can start new ones and drop removed ones.
    pub fn watches_changed_since(&self, rev: i64) -> Result<Vec<ScheduledWatch>, StoreError> {
        self.scheduled("WHERE rev > ?1", rev)
    }

    fn scheduled(&self, filter: &str, rev: i64) -> Result<Vec<ScheduledWatch>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT job_id, org_id, endpoint_name, state, body_hash, created_at FROM watches {filter} ORDER BY rev"
        );
        let mut stmt = conn.prepare(&sql)?;
        let bind = if filter.contains("?1") { vec![rev] } else { vec![] };
        let rows = stmt.query_map(rusqlite::params_from_iter(bind), |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, org, endpoint, state, body_hash, created_at) = row?;
            out.push(ScheduledWatch {
                job_id,
                portal: PortalId { org, endpoint },
                state: WatchState::parse(&state)?,
                body_hash: body_hash.map(|h| h as u64),
                created_at,
            });
        }
        Ok(out)
    }

    /// What the diff needs about one watch; `None` if it does not exist.
    pub fn diff_context(&self, job_id: &str) -> Result<Option<DiffContext>, StoreError> {
        read_diff_context(&self.conn(), job_id)
    }

    /// Reads a watch's [`DiffContext`], lets `decide` turn it into a
    /// [`PollCommit`] (or nothing, to leave the watch untouched), and applies
    /// that commit: all on the writer thread, in one savepoint of a batched
    /// transaction. The read and the write see the same state and cost no
    /// extra hop between threads. Returns `None` for a missing watch or when
    /// `decide` declines; otherwise the commit's outcome and `decide`'s `T`.
    pub async fn write_poll_with<T, F>(
        &self,
        job_id: String,
        decide: F,
    ) -> Result<Option<(CommitOutcome, T)>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(DiffContext) -> Option<(PollCommit, T)> + Send + 'static,
    {
        let job: WriteJob = Box::new(move |conn, now| {
            let decided = read_diff_context(conn, &job_id)?.and_then(decide);
            let result = match decided {
                None => None,
                Some((commit, extra)) => Some((apply_poll(conn, &commit, now)?, extra)),
            };
            Ok(Box::new(result) as Box<dyn Any + Send>)
        });
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer()?.send(WriteOp::Job(job, reply)).map_err(|_| writer_gone())?;
        let value = answer.await.map_err(|_| writer_gone())??;
        Ok(*value.downcast::<Option<(CommitOutcome, T)>>().expect("the job returns what its caller expects"))
    }

    /// Records an attempt and moves its delivery on, through the batching writer.
    pub async fn write_attempt(
        &self,
        id: i64,
        attempt: AttemptRecord,
        update: DeliveryUpdate,
    ) -> Result<(), StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer()?.send(WriteOp::Attempt(id, attempt, update, reply)).map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// The batching writer's queue, starting its thread and connection on
    /// first use (the CLI never needs them).
    fn writer(&self) -> Result<std::sync::mpsc::Sender<WriteOp>, StoreError> {
        let mut slot = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = slot.as_ref() {
            return Ok(tx.clone());
        }
        let conn = open_connection(&self.path)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let commits = Arc::clone(&self.commits);
        let vitals = Arc::clone(&self.vitals);
        vitals.writer_alive.store(true, Ordering::Relaxed);
        vitals.writer_started.store(true, Ordering::Relaxed);
        std::thread::Builder::new()
            .name("dari-relay-writer".into())
            .spawn(move || {
                let alive = WriterAlive(vitals);
                writer_loop(conn, rx, &commits, &alive.0);
            })
            .map_err(|e| StoreError::Write(format!("cannot start the writer thread: {e}")))?;
        *slot = Some(tx.clone());
        Ok(tx)
    }

    /// Gives up on an active watch: marks it `failed` with `reason` and
    /// stores its `watch.failed` notification, in one transaction.
    pub fn fail_watch(
        &self,
        job_id: &str,
        reason: &str,
        notification: &NewNotification,
    ) -> Result<CommitOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let updated = tx.execute(
            "UPDATE watches SET state = 'failed', state_reason = ?2, updated_at = ?3 WHERE job_id = ?1 AND state = 'active'",
            params![job_id, reason, now],
        )?;
        if updated == 0 {
            return Ok(CommitOutcome::WatchGone);
        }
        let deliveries = insert_notifications(&tx, job_id, std::slice::from_ref(notification), now)?;
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(CommitOutcome::Stored { deliveries })
    }

    // ----- deliveries ---------------------------------------------------

    /// The first pending delivery of each of `webhook`'s (job, webhook)
    /// chains, earliest first, at most `limit`. Later deliveries of a chain
    /// wait for its head: that is the per-job, per-webhook ordering guarantee.
    pub fn pending_heads(&self, webhook: &str, limit: usize) -> Result<Vec<PendingHead>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT d.id, d.job_id, d.webhook, d.next_attempt_at FROM deliveries d
             WHERE d.state = 'pending' AND d.webhook = ?1 AND NOT EXISTS (
                 SELECT 1 FROM deliveries e
                 WHERE e.job_id = d.job_id AND e.webhook = d.webhook AND e.state = 'pending' AND e.id < d.id)
             ORDER BY d.next_attempt_at, d.id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![webhook, sql_limit(limit)], |r| {
            Ok(PendingHead { id: r.get(0)?, job_id: r.get(1)?, webhook: r.get(2)?, next_attempt_at: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deliveries with their notifications, for sending, in id order.
    pub fn outbound_many(&self, ids: &[i64]) -> Result<Vec<OutboundDelivery>, StoreError> {
        // In chunks: one statement with more bound ids than SQLite allows
        // (32,766) would fail every time it was tried.
        if ids.len() > OUTBOUND_CHUNK {
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(OUTBOUND_CHUNK) {
                out.extend(self.outbound_many(chunk)?);
            }
            out.sort_by_key(|d| d.id);
            return Ok(out);
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn();
        let marks = vec!["?"; ids.len()].join(",");
        let mut stmt = conn.prepare(&format!(
            "SELECT d.id, d.msg_id, d.webhook, d.job_id, n.type, {BODY_COLUMNS}, d.attempts, n.created_at
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id LEFT JOIN answers a ON a.id = n.answer_id
             WHERE d.id IN ({marks}) ORDER BY d.id"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(ids), |r| {
            Ok(OutboundDelivery {
                id: r.get(0)?,
                msg_id: r.get(1)?,
                webhook: r.get(2)?,
                job_id: r.get(3)?,
                kind: r.get(4)?,
                body: read_body(r, 5)?,
                attempts: r.get(9)?,
                detected_at: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deliveries for `deliveries list`, newest first, at most `limit`.
    pub fn list_deliveries(
        &self,
        state: Option<DeliveryState>,
        limit: usize,
    ) -> Result<Vec<DeliverySummary>, StoreError> {
        let conn = self.conn();
        // With a state, `d.state = ?1` alone, so the (state, id) index
        // serves it: `?1 IS NULL OR ...` made SQLite walk every delivery
        // ever kept to find the few failed ones.
        let filter = if state.is_some() { "d.state = ?1" } else { "?1 IS NULL" };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT d.id, d.msg_id, d.job_id, d.webhook, n.type, d.state, d.attempts, d.next_attempt_at, d.created_at, d.last_error
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE {filter} ORDER BY d.id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![state.map(DeliveryState::as_str), sql_limit(limit)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, u32>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, Option<String>>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, msg_id, job_id, webhook, kind, state, attempts, next, created, last_error) = row?;
            let state =
                DeliveryState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("delivery state {state:?}")))?;
            out.push(DeliverySummary {
                id,
                msg_id,
                job_id,
                webhook,
                kind,
                state: state.as_str(),
                attempts,
                next_attempt_at: (state == DeliveryState::Pending).then(|| ms_to_rfc3339(next)),
                created_at: ms_to_rfc3339(created),
                last_error,
            });
        }
        Ok(out)
    }

    /// Puts failed deliveries back to pending on a fresh schedule (their
    /// `webhook-id` unchanged): one by id, or every failed one with `None`.
    /// Returns how many were requeued.
    pub fn retry_failed(&self, id: Option<i64>) -> Result<usize, StoreError> {
        let conn = self.conn();
        Ok(conn.execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, finished_at = NULL
             WHERE state = 'failed' AND (?1 IS NULL OR id = ?1)",
            params![id, now_ms()],
        )?)
    }

    /// Pauses a webhook (a receiver answered 410 Gone). Idempotent.
    pub fn pause_webhook(&self, webhook: &str, reason: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO webhook_pauses (webhook, reason, paused_at) VALUES (?1, ?2, ?3) ON CONFLICT (webhook) DO NOTHING",
            params![webhook, reason, now_ms()],
        )?;
        Ok(())
    }

    /// Resumes a paused webhook. Returns `false` if it was not paused.
    pub fn resume_webhook(&self, webhook: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM webhook_pauses WHERE webhook = ?1", [webhook])? == 1)
    }

    /// Paused webhooks with why and since when (Unix ms).
    pub fn paused_webhooks(&self) -> Result<BTreeMap<String, (String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT webhook, reason, paused_at FROM webhook_pauses")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Per webhook: pending and failed deliveries, and the oldest pending
    /// one's creation time (Unix ms).
    pub fn backlog(&self) -> Result<BTreeMap<String, Backlog>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT webhook, SUM(state = 'pending'), SUM(state = 'failed'), MIN(CASE WHEN state = 'pending' THEN created_at END)
             FROM deliveries WHERE state IN ('pending', 'failed') GROUP BY webhook",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, Backlog { pending: r.get(1)?, failed: r.get(2)?, oldest_pending: r.get(3)? }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every attempt of a delivery, oldest first.
    pub fn attempts(&self, delivery_id: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT attempted_at, duration_ms, http_status, response_excerpt, error FROM attempts
             WHERE delivery_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([delivery_id], |r| {
            Ok(AttemptRecord {
                attempted_at: r.get(0)?,
                duration_ms: r.get(1)?,
                http_status: r.get(2)?,
                response_excerpt: r.get(3)?,
                error: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A job's notifications in order, each with its deliveries.
    pub fn notifications_of(&self, job_id: &str) -> Result<Vec<StoredNotification>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            &format!("SELECT n.id, n.type, {BODY_COLUMNS}, n.created_at, d.webhook, d.msg_id, d.state, d.attempts
             FROM notifications n LEFT JOIN deliveries d ON d.notification_id = n.id LEFT JOIN answers a ON a.id = n.answer_id
             WHERE n.job_id = ?1 ORDER BY n.id, d.id"),
        )?;
        let rows = stmt.query_map([job_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                read_body(r, 2)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, Option<u32>>(10)?,
            ))
        })?;
        let mut out: Vec<StoredNotification> = Vec::new();
        for row in rows {
            let (id, kind, body, created, webhook, msg_id, state, attempts) = row?;
            if out.last().is_none_or(|n| n.id != id) {
                out.push(StoredNotification { id, kind, body, created_at: created, deliveries: Vec::new() });
            }
            if let (Some(webhook), Some(msg_id), Some(state)) = (webhook, msg_id, state) {
                let state = DeliveryState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("delivery state {state:?}")))?;
                let last = out.last_mut().expect("pushed above");
                last.deliveries.push(StoredDelivery { webhook, msg_id, state, attempts: attempts.unwrap_or(0) });
            }
        }
        Ok(out)
    }

    /// Deletes what is past `retention`: delivered deliveries finished before
    /// `cutoff_ms` with their attempts, notifications left with no
    /// deliveries (and answers left with no notifications), and watches that
    /// ended (finished, failed, removed) before it together with their
    /// notifications. Pending and failed deliveries are never pruned: they
    /// are work not yet done, and so are their notifications and watches.
    ///
    /// It runs on its own connection, in transactions of at most
    /// [`PRUNE_BATCH`] rows, each found through an index, and between
    /// batches it lets the writer finish what it has in hand: a week of
    /// history is pruned without stopping polls or attempts for more than a
    /// batch, and without holding the lock the reads share.
    pub fn prune(&self, cutoff_ms: i64) -> Result<PruneSummary, StoreError> {
        let mut conn = open_connection(&self.path)?;
        let mut summary = PruneSummary::default();
        let batch = PRUNE_BATCH as i64;
        loop {
            let done = self.prune_batch(&mut conn, |tx| {
                let ids: Vec<i64> = tx
                    .prepare_cached(
                        "SELECT id FROM deliveries WHERE state = 'delivered' AND finished_at < ?1
                         ORDER BY finished_at LIMIT ?2",
                    )?
                    .query_map(params![cutoff_ms, batch], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                // The batch's ids as one JSON array: two statements per batch.
                let list = serde_json::to_string(&ids).expect("ids serialise");
                summary.attempts += tx
                    .prepare_cached("DELETE FROM attempts WHERE delivery_id IN (SELECT value FROM json_each(?1))")?
                    .execute([&list])?;
                summary.deliveries += tx
                    .prepare_cached("DELETE FROM deliveries WHERE id IN (SELECT value FROM json_each(?1))")?
                    .execute([&list])?;
                Ok(ids.len() < PRUNE_BATCH)
            })?;
            if done {
                break;
            }
        }
        // Old notifications in (created_at, id) order from a cursor: each is
        // looked at once, and those kept (work not done) are passed over.
        let mut cursor = (i64::MIN, i64::MIN);
        loop {
            let done = self.prune_batch(&mut conn, |tx| {
                let rows: Vec<(i64, i64, Option<i64>)> = tx
                    .prepare_cached(
                        "SELECT id, created_at, answer_id FROM notifications
                         WHERE created_at < ?1 AND (created_at, id) > (?2, ?3) ORDER BY created_at, id LIMIT ?4",
                    )?
                    .query_map(params![cutoff_ms, cursor.0, cursor.1, batch], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect::<Result<_, _>>()?;
                if let Some((id, created_at, _)) = rows.last() {
                    cursor = (*created_at, *id);
                }
                let list = serde_json::to_string(&rows.iter().map(|r| r.0).collect::<Vec<_>>()).expect("ids serialise");
                let mut answers: Vec<Option<i64>> = tx
                    .prepare_cached(
                        "DELETE FROM notifications WHERE id IN (SELECT value FROM json_each(?1))
                             AND NOT EXISTS (SELECT 1 FROM deliveries WHERE notification_id = notifications.id)
                         RETURNING answer_id",
                    )?
                    .query_map([&list], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                summary.notifications += answers.len();
                answers.sort_unstable();
                answers.dedup();
                let answers = answers.into_iter().flatten();
                let mut answer = tx.prepare_cached(
                    "DELETE FROM answers WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM notifications WHERE answer_id = ?1)",
                )?;
                for id in answers {
                    answer.execute([id])?;
                }
                Ok(rows.len() < PRUNE_BATCH)
            })?;
            if done {
                break;
            }
        }
        let mut cursor = 0_i64;
        loop {
            let done = self.prune_batch(&mut conn, |tx| {
                let rows: Vec<(i64, String)> = tx
                    .prepare_cached(
                        "SELECT rowid, job_id FROM watches WHERE rowid > ?2 AND state != 'active' AND updated_at < ?1
                         ORDER BY rowid LIMIT ?3",
                    )?
                    .query_map(params![cutoff_ms, cursor, batch], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut watch = tx.prepare_cached(
                    "DELETE FROM watches WHERE rowid = ?1 AND NOT EXISTS (SELECT 1 FROM notifications WHERE job_id = ?2)",
                )?;
                for (rowid, job_id) in &rows {
                    cursor = *rowid;
                    summary.watches += watch.execute(params![rowid, job_id])?;
                }
                Ok(rows.len() < PRUNE_BATCH)
            })?;
            if done {
                break;
            }
        }
        Ok(summary)
    }

    /// One pruning transaction: first lets in the writer if it waits for the
    /// lock (for at most [`PRUNE_YIELD`]), then runs `f` under an immediate
    /// write lock and commits. Without the wait the pruner, releasing and
    /// retaking the lock at once, would keep it from a writer that sleeps
    /// between its tries (SQLite's busy handler) until pruning ends.
    fn prune_batch<T>(
        &self,
        conn: &mut Connection,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let deadline = Instant::now() + PRUNE_YIELD;
        while self.vitals.writer_waiting.load(Ordering::Relaxed) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(value)
    }

    /// Fills the database with `notifications` delivered notifications
    /// (finished at `at_ms`) of a finished watch `job_id`, each with one
    /// delivery per webhook in `webhooks` and, `with_attempts`, one attempt
    /// per delivery, in one transaction. For tests of pruning at scale.
    #[doc(hidden)]
    pub fn seed_history_for_test(
        &self,
        job_id: &str,
        notifications: usize,
        webhooks: &[&str],
        at_ms: i64,
        with_attempts: bool,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO watches (job_id, org_id, endpoint_name, labels, from_now, state, rev, created_at, updated_at)
             VALUES (?1, 'seed', 'seed', '{}', 0, 'finished', 0, ?2, ?2) ON CONFLICT DO NOTHING",
            params![job_id, at_ms],
        )?;
        // Set-based, so that the test's time goes to pruning, not seeding.
        let first: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM notifications", [], |r| r.get(0))?;
        tx.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?3)
             INSERT INTO notifications (job_id, type, body, created_at) SELECT ?1, 'job.event', '{}', ?2 FROM n",
            params![job_id, at_ms, notifications as i64],
        )?;
        let webhooks = serde_json::to_string(webhooks).expect("names serialise");
        tx.execute(
            "INSERT INTO deliveries (notification_id, job_id, webhook, msg_id, state, attempts, next_attempt_at,
                 created_at, finished_at)
             SELECT n.id, n.job_id, w.value, 'msg_seed_' || n.id || '_' || w.value, 'delivered', 1, ?2, ?2, ?2
             FROM notifications n, json_each(?3) w WHERE n.id >= ?1 ORDER BY n.id, w.key",
            params![first, at_ms, webhooks],
        )?;
        if with_attempts {
            tx.execute(
                "INSERT INTO attempts (delivery_id, attempted_at, duration_ms, http_status)
                 SELECT d.id, ?2, 1, 200 FROM deliveries d WHERE d.notification_id >= ?1",
                params![first, at_ms],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Makes this connection refuse (`true`) or accept writes, as a full or
    /// read-only disk would. For fault-injection tests.
    #[doc(hidden)]
    pub fn set_read_only(&self, read_only: bool) -> Result<(), StoreError> {
        self.conn().pragma_update(None, "query_only", read_only)?;
        // What `writable` remembers is about the disk before the change.
        self.vitals.last_write.store(0, Ordering::Relaxed);
        *self.vitals.checked.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let (reply, answer) = std::sync::mpsc::channel();
        self.writer()?.send(WriteOp::ReadOnly(read_only, reply)).map_err(|_| writer_gone())?;
        answer.recv().map_err(|_| writer_gone())?
    }

    /// Bytes the database holds (pages in use, the WAL included), for the
    /// storage tests.
    pub fn stored_bytes(&self) -> Result<u64, StoreError> {
        let conn = self.conn();
        let pages: i64 = conn.query_row(
            "SELECT page_count - freelist_count FROM pragma_page_count, pragma_freelist_count",
            [],
            |r| r.get(0),
        )?;
        let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok((pages * size) as u64)
    }

    /// Counts of deliveries per state, for the demo and the tests.
    pub fn delivery_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM deliveries GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records an attempt a receiver answered with a rate limit (429, or 503
    /// with `Retry-After`) and moves a pending delivery's next attempt to
    /// `at_ms` without counting it as one of the schedule's retries: a
    /// receiver asking to slow down has not failed the delivery. Used by the
    /// deliverer only (see `deliver::classify`).
    pub fn defer_delivery(&self, id: i64, attempt: &AttemptRecord, at_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.prepare_cached(
            "INSERT INTO attempts (delivery_id, attempted_at, duration_ms, http_status, response_excerpt, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            id,
            attempt.attempted_at,
            attempt.duration_ms,
            attempt.http_status,
            attempt.response_excerpt,
            attempt.error
        ])?;
        tx.prepare_cached(
            "UPDATE deliveries SET next_attempt_at = ?2, last_error = ?3 WHERE id = ?1 AND state = 'pending'",
        )?
        .execute(params![id, at_ms, attempt.error])?;
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// When a delivery was first attempted (Unix ms), if it was: the start of
    /// the time a rate-limited delivery may keep waiting without giving up.
    pub fn first_attempt_at(&self, id: i64) -> Result<Option<i64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT MIN(attempted_at) FROM attempts WHERE delivery_id = ?1")?;
        Ok(stmt.query_row([id], |r| r.get(0))?)
    }
}

/// Takes the write lock and writes, then rolls back.
fn try_write(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("UPDATE meta SET value = value WHERE key = 'watch_rev'", [])?;
    tx.rollback()?;
    Ok(())
}

/// A watch's [`DiffContext`], on any connection.
fn read_diff_context(conn: &Connection, job_id: &str) -> Result<Option<DiffContext>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT org_id, endpoint_name, webhooks, labels, from_now, state, last_status, event_fps
             FROM watches WHERE job_id = ?1",
        )?
        .query_row([job_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Vec<u8>>(7)?,
            ))
        })
        .optional()?;
    let Some((org, endpoint, webhooks, labels, from_now, state, last_status, fps)) = row else {
        return Ok(None);
    };
    if fps.len() % 8 != 0 {
        return Err(StoreError::Corrupt(format!("event fingerprints of job {job_id}")));
    }
    let event_fingerprints = fps.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect();
    Ok(Some(DiffContext {
        portal: PortalId { org, endpoint },
        webhooks: parse_webhooks(webhooks.as_deref())?,
        labels: parse_labels(&labels)?,
        from_now,
        state: WatchState::parse(&state)?,
        seen: SeenState { status: last_status, event_fingerprints },
    }))
}

/// Stores a poll's new state, its notifications and their deliveries,
/// provided the watch is still active; on any connection or savepoint.
fn apply_poll(conn: &Connection, commit: &PollCommit, now: i64) -> Result<CommitOutcome, StoreError> {
    let fps: Vec<u8> = commit.seen.event_fingerprints.iter().flat_map(|f| f.to_be_bytes()).collect();
    let (state, reason) = match &commit.end {
        None => (WatchState::Active, None),
        Some((state, reason)) => (*state, Some(reason.as_str())),
    };
    let updated = conn.prepare_cached(
        "UPDATE watches SET last_status = ?2, event_fps = ?3, body_hash = ?4, state = ?5, state_reason = ?6, updated_at = ?7
         WHERE job_id = ?1 AND state = 'active'",
    )?
    .execute(params![commit.job_id, commit.seen.status, fps, commit.body_hash as i64, state.as_str(), reason, now])?;
    if updated == 0 {
        return Ok(CommitOutcome::WatchGone);
    }
    let deliveries = insert_notifications(conn, &commit.job_id, &commit.notifications, now)?;
    Ok(CommitOutcome::Stored { deliveries })
}

/// Records an attempt and moves its delivery on; on any connection or savepoint.
fn apply_attempt(
    conn: &Connection,
    id: i64,
    attempt: &AttemptRecord,
    update: DeliveryUpdate,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO attempts (delivery_id, attempted_at, duration_ms, http_status, response_excerpt, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        id,
        attempt.attempted_at,
        attempt.duration_ms,
        attempt.http_status,
        attempt.response_excerpt,
        attempt.error
    ])?;
    let (state, next, finished) = match update {
        DeliveryUpdate::Delivered => ("delivered", attempt.attempted_at, Some(now)),
        DeliveryUpdate::RetryAt(at) => ("pending", at, None),
        DeliveryUpdate::GaveUp => ("failed", attempt.attempted_at, Some(now)),
        DeliveryUpdate::Paused => ("pending", attempt.attempted_at, None),
    };
    let counted = i64::from(update != DeliveryUpdate::Paused);
    let error = attempt.error.clone().or_else(|| attempt.http_status.map(|s| format!("HTTP {s}")));
    conn.prepare_cached(
        "UPDATE deliveries SET state = ?2, attempts = attempts + ?6, next_attempt_at = ?3, finished_at = ?4,
             last_error = CASE WHEN ?2 = 'delivered' THEN NULL ELSE ?5 END
         WHERE id = ?1",
    )?
    .execute(params![id, state, next, finished, error, counted])?;
    Ok(())
}

/// A read-modify-write for the writer thread (see [`Store::write_poll_with`]).
type WriteJob = Box<dyn FnOnce(&Connection, i64) -> Result<Box<dyn Any + Send>, StoreError> + Send>;

/// A write for the batching writer, with where to send its result.
enum WriteOp {
    Job(WriteJob, tokio::sync::oneshot::Sender<Result<Box<dyn Any + Send>, StoreError>>),
    Attempt(i64, AttemptRecord, DeliveryUpdate, tokio::sync::oneshot::Sender<Result<(), StoreError>>),
    /// Test hook: answered at once on a std channel, so a caller may block on it.
    ReadOnly(bool, std::sync::mpsc::Sender<Result<(), StoreError>>),
    /// Test hook: the writer thread ends, as if it had crashed.
    Stop(std::sync::mpsc::Sender<()>),
}

/// Most writes folded into one transaction.
const MAX_BATCH: usize = 512;

/// The writer thread: takes every write waiting, applies each in its own
/// savepoint (so one failing write cannot undo or block the others), commits
/// them in one transaction and only then answers each. While it waits for
/// the disk, the next batch queues up: group commit, one fsync for many
/// polls. It ends when the store is dropped.
fn writer_loop(mut conn: Connection, rx: std::sync::mpsc::Receiver<WriteOp>, commits: &AtomicU64, vitals: &Vitals) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Test hooks are answered outside any transaction.
        let mut stop = None;
        batch.retain_mut(|op| match op {
            WriteOp::ReadOnly(on, reply) => {
                let _ = reply.send(conn.pragma_update(None, "query_only", *on).map_err(StoreError::from));
                false
            }
            WriteOp::Stop(reply) => {
                stop = Some(reply.clone());
                false
            }
            _ => true,
        });
        if let Some(stop) = stop {
            // Everything else in hand is answered "writer gone" by the drop.
            let _ = stop.send(());
            return;
        }
        if !batch.is_empty() {
            write_batch(&mut conn, batch, commits, vitals);
        }
    }
}

fn write_batch(conn: &mut Connection, batch: Vec<WriteOp>, commits: &AtomicU64, vitals: &Vitals) {
    /// A result waiting for the commit, with its reply channel.
    enum Done {
        Unit(Result<(), StoreError>, tokio::sync::oneshot::Sender<Result<(), StoreError>>),
        Job(
            Result<Box<dyn Any + Send>, StoreError>,
            tokio::sync::oneshot::Sender<Result<Box<dyn Any + Send>, StoreError>>,
        ),
    }
    let now = now_ms();
    // IMMEDIATE: the write lock is taken at BEGIN, where the busy timeout
    // applies. A deferred transaction reads first and then asks to write,
    // and that upgrade fails at once (SQLITE_BUSY, no waiting) whenever
    // another connection, the CLI or the pruner, holds the lock.
    vitals.writer_waiting.store(true, Ordering::Relaxed);
    let began = conn.transaction_with_behavior(TransactionBehavior::Immediate);
    vitals.writer_waiting.store(false, Ordering::Relaxed);
    let mut tx = match began {
        Ok(tx) => tx,
        Err(e) => {
            vitals.record(&vitals.writes_failing_since, false);
            let e = e.to_string();
            for op in batch {
                match op {
                    WriteOp::Attempt(.., reply) => drop(reply.send(Err(StoreError::Write(e.clone())))),
                    WriteOp::Job(_, reply) => drop(reply.send(Err(StoreError::Write(e.clone())))),
                    WriteOp::ReadOnly(..) | WriteOp::Stop(_) => {}
                }
            }
            return;
        }
    };
    let mut done = Vec::with_capacity(batch.len());
    let mut any_ok = false;
    for op in batch {
        match op {
            WriteOp::ReadOnly(..) | WriteOp::Stop(_) => {}
            WriteOp::Attempt(id, attempt, update, reply) => {
                let result = in_savepoint(&mut tx, |c| apply_attempt(c, id, &attempt, update, now));
                any_ok |= result.is_ok();
                done.push(Done::Unit(result, reply));
            }
            WriteOp::Job(job, reply) => {
                let result = in_savepoint(&mut tx, |c| job(c, now));
                any_ok |= result.is_ok();
                done.push(Done::Job(result, reply));
            }
        }
    }
    let committed = tx.commit().map_err(|e| e.to_string());
    if committed.is_ok() {
        commits.fetch_add(1, Ordering::Relaxed);
    }
    let ok = committed.is_ok() && any_ok;
    if ok {
        vitals.last_write.store(vitals.stamp(Instant::now()), Ordering::Relaxed);
    }
    vitals.record(&vitals.writes_failing_since, ok);
    // Nobody hears "stored" before the commit is on disk.
    for d in done {
        match d {
            Done::Unit(result, reply) => {
                let _ = reply.send(committed.clone().map_err(StoreError::Write).and(result));
            }
            Done::Job(result, reply) => {
                let _ = reply.send(committed.clone().map_err(StoreError::Write).and(result));
            }
        }
    }
}

/// Runs `f` in a savepoint of `tx`: kept if it succeeds, rolled back if not.
/// The savepoint statements are prepared once and cached: parsing them anew
/// for every write was a tenth of the writer's time.
fn in_savepoint<T>(
    tx: &mut Transaction<'_>,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let run = |sql: &str| -> Result<(), StoreError> {
        tx.prepare_cached(sql)?.raw_execute()?;
        Ok(())
    };
    run("SAVEPOINT write_op")?;
    // A panic in one write (a poll's `decide` runs here) fails that write
    // only: without this it ended the writer thread, and every write after it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tx)))
        .unwrap_or_else(|panic| Err(StoreError::Task(format!("a write panicked: {}", panic_message(&panic)))));
    match result {
        Ok(value) => {
            run("RELEASE write_op")?;
            Ok(value)
        }
        Err(e) => {
            // Undo this write only; the rest of the batch stands.
            run("ROLLBACK TO write_op")?;
            run("RELEASE write_op")?;
            Err(e)
        }
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}

fn writer_gone() -> StoreError {
    StoreError::Write("the writer thread has stopped".into())
}

fn bump_rev(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    Ok(tx.query_row("UPDATE meta SET value = value + 1 WHERE key = 'watch_rev' RETURNING value", [], |r| r.get(0))?)
}

fn insert_notifications(
    tx: &Connection,
    job_id: &str,
    notifications: &[NewNotification],
    now: i64,
) -> Result<usize, StoreError> {
    let mut notification = tx.prepare_cached(
        "INSERT INTO notifications (job_id, type, body, answer_id, event, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         RETURNING id",
    )?;
    let mut answer = tx.prepare_cached("INSERT INTO answers (before, after) VALUES (?1, ?2) RETURNING id")?;
    let mut delivery = tx.prepare_cached(
        "INSERT INTO deliveries (notification_id, job_id, webhook, msg_id, state, next_attempt_at, created_at)
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5)",
    )?;
    let mut count = 0;
    // The answer part last stored, by identity: a poll's notifications all
    // share one `Arc`, so it is written once.
    let mut stored: Option<(*const notification::SharedAnswer, i64)> = None;
    for n in notifications {
        let (body, answer_id, event) = match &n.body {
            Body::Whole(body) => (body.as_str(), None, None),
            Body::Parts { head, shared, event } => {
                let answer_id = match stored {
                    Some((ptr, id)) if std::ptr::eq(ptr, Arc::as_ptr(shared)) => id,
                    _ => {
                        let id: i64 = answer.query_row(params![shared.before, shared.after], |r| r.get(0))?;
                        stored = Some((Arc::as_ptr(shared), id));
                        id
                    }
                };
                (head.as_str(), Some(answer_id), event.as_deref())
            }
        };
        let id: i64 = notification.query_row(params![job_id, n.kind, body, answer_id, event, now], |r| r.get(0))?;
        for d in &n.deliveries {
            delivery.execute(params![id, job_id, d.webhook, d.msg_id, now])?;
            count += 1;
        }
    }
    Ok(count)
}

/// A row limit for SQL. `usize as i64` turned a huge limit into -1, which
/// SQLite reads as "no limit": every row into memory.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The columns [`read_body`] reads, in order, from `notifications n LEFT
/// JOIN answers a`.
const BODY_COLUMNS: &str = "n.body, n.event, a.before, a.after";

/// The standard body of a notification row: the stored body itself, or
/// (when the row shares its answer) composed from its parts. The same
/// parts always compose to the same bytes, so retries and replays send
/// exactly what the first attempt sent.
fn read_body(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<String> {
    let body: String = r.get(first)?;
    let event: Option<String> = r.get(first + 1)?;
    match (r.get::<_, Option<String>>(first + 2)?, r.get::<_, Option<String>>(first + 3)?) {
        (Some(before), Some(after)) => Ok(notification::compose(&body, &before, event.as_deref(), &after)),
        _ => Ok(body),
    }
}

fn parse_webhooks(text: Option<&str>) -> Result<Option<Vec<String>>, StoreError> {
    text.map(|t| serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("webhook list: {e}")))).transpose()
}

fn parse_labels(text: &str) -> Result<Map<String, Value>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        (dir, store)
    }

    /// How SQLite runs `sql`: one line per step of its plan.
    fn plan(store: &Store, sql: &str) -> String {
        let conn = store.conn();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let n = stmt.parameter_count();
        let params: Vec<rusqlite::types::Value> = (0..n).map(|_| rusqlite::types::Value::Integer(1)).collect();
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
    }

    /// The lookups that run per pruned row or per listed notification go
    /// through an index: none of them scans the deliveries (which grow with
    /// history). Before the third migration, each looked at every delivery.
    #[test]
    fn history_lookups_use_indexes() {
        let (_dir, store) = store();
        for sql in [
            "SELECT 1 FROM deliveries WHERE notification_id = ?1",
            "SELECT id FROM deliveries WHERE state = 'delivered' AND finished_at < ?1 ORDER BY finished_at LIMIT ?2",
            "SELECT id, created_at, answer_id FROM notifications
             WHERE created_at < ?1 AND (created_at, id) > (?2, ?3) ORDER BY created_at, id LIMIT ?4",
            "SELECT 1 FROM notifications WHERE answer_id = ?1",
            "SELECT n.id, d.id FROM notifications n LEFT JOIN deliveries d ON d.notification_id = n.id
             WHERE n.job_id = ?1 ORDER BY n.id, d.id",
            "SELECT d.id FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.state = ?1 ORDER BY d.id DESC LIMIT ?2",
        ] {
            let plan = plan(&store, sql);
            assert!(!plan.contains("SCAN d") && !plan.contains("SCAN notifications"), "{sql}\n{plan}");
        }
    }

    #[test]
    fn huge_limits_stay_limits() {
        assert_eq!(sql_limit(usize::MAX), i64::MAX);
        assert_eq!(sql_limit(10), 10);
    }

    fn add(store: &Store, job_id: &str) {
        let watch = NewWatch {
            job_id: job_id.into(),
            portal: "acme/portal".parse().unwrap(),
            webhooks: None,
            labels: BTreeMap::new(),
            from_now: false,
        };
        store.add_watches(&[watch]).unwrap();
    }

    /// A write that panics fails alone: the writer thread lives on and the
    /// next write is stored. Before, the panic ended the thread and every
    /// later write failed with "the writer thread has stopped".
    #[tokio::test]
    async fn a_panicking_write_leaves_the_writer_alive() {
        let (_dir, store) = store();
        add(&store, "j");
        let panicked = store.write_poll_with("j".into(), |_| -> Option<(PollCommit, ())> { panic!("boom") }).await;
        assert!(matches!(panicked, Err(StoreError::Task(ref m)) if m.contains("boom")), "{panicked:?}");
        let commit = PollCommit {
            job_id: "j".into(),
            seen: SeenState { status: Some("running".into()), event_fingerprints: vec![] },
            body_hash: 1,
            end: None,
            notifications: vec![],
        };
        let stored = store.write_poll_with("j".into(), move |_| Some((commit, ()))).await.unwrap();
        assert_eq!(stored.map(|s| s.0), Some(CommitOutcome::Stored { deliveries: 0 }));
        assert!(store.problems_at(Instant::now(), Duration::from_secs(15)).is_empty());
    }

    /// Writes that all fail for longer than the limit are a problem (seen
    /// on the monotonic clock, scripted here); one success clears it; a
    /// stopped writer thread is a problem at once.
    #[tokio::test]
    async fn failing_writes_and_a_dead_writer_are_problems() {
        let (_dir, store) = store();
        add(&store, "j");
        store.set_read_only(true).unwrap();
        let commit = PollCommit {
            job_id: "j".into(),
            seen: SeenState { status: Some("running".into()), event_fingerprints: vec![] },
            body_hash: 1,
            end: None,
            notifications: vec![],
        };
        let again = commit.clone();
        assert!(store.write_poll_with("j".into(), move |_| Some((commit, ()))).await.is_err());
        let limit = Duration::from_secs(15);
        let now = Instant::now();
        assert!(store.problems_at(now, limit).is_empty(), "not yet: one failure is not a run");
        let later = store.problems_at(now + Duration::from_secs(16), limit);
        assert!(later.iter().any(|p| p.contains("every database write failed")), "{later:?}");
        assert_eq!(store.writable(Duration::from_secs(5)).map_err(|e| e.contains("readonly")), Err(true));
        store.set_read_only(false).unwrap();
        store.write_poll_with("j".into(), move |_| Some((again, ()))).await.unwrap();
        assert!(store.problems_at(now + Duration::from_secs(16), limit).is_empty());
        assert_eq!(store.writable(Duration::from_secs(5)), Ok(()));

        store.stop_writer_for_test().unwrap();
        assert_eq!(store.problems_at(Instant::now(), limit), ["the database writer thread has stopped"]);
    }

    /// A lock held by another connection does not make the probe wait (nor
    /// count as "not writable"), and a fresh commit answers without a check.
    #[test]
    fn the_readiness_check_does_not_queue_on_the_lock() {
        let (dir, store) = store();
        let other = Connection::open(dir.path().join("s.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = Instant::now();
        assert_eq!(store.writable(Duration::from_secs(5)), Ok(()));
        assert!(started.elapsed() < Duration::from_secs(1), "waited {:?}", started.elapsed());
        // Cached: the second probe does not even try.
        let started = Instant::now();
        assert_eq!(store.writable(Duration::from_secs(5)), Ok(()));
        assert!(started.elapsed() < Duration::from_millis(50));
        other.execute_batch("COMMIT").unwrap();
    }
}
