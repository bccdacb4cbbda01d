//! The SQLite implementation of the store.

pub mod copy;
mod heads;
mod live;
mod operator;
mod ops;
mod outbox;
mod prune;
pub mod running;
mod schema;
#[cfg(test)]
mod tests;
mod ui;
mod watches;
mod writer;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};
use rusqlite_migration::{M, Migrations};
use serde_json::{Map, Value};

use crate::notification::{self};
use crate::store::*;
use crate::vocab::WatchState;

use schema::MIGRATIONS;
use writer::*;

/// The database.
pub struct Store {
    /// For reads and the rare writes (CLI changes, pauses, pruning).
    conn: Mutex<Connection>,
    /// The file, for the writer's own connection.
    path: PathBuf,
    /// The batching writer's queue, once started; see [`Store::commit_poll`].
    writer: Mutex<Option<std::sync::mpsc::Sender<WriteOp>>>,
    /// Write transactions committed through this handle, for the benchmark.
    commits: Arc<AtomicU64>,
    /// How the writer thread and the store calls are faring, for `/readyz`
    /// and the watchdog; shared with the writer thread.
    vitals: Arc<Vitals>,
    /// Set by [`Store::hold_paused_time_while_writing`] (tests only).
    hold_paused_time: AtomicBool,
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
pub(super) const OUTBOUND_CHUNK: usize = 500;

/// Rows one pruning transaction handles at most: each batch holds the
/// write lock for milliseconds, so polls and attempts get in between.
pub(super) const PRUNE_BATCH: usize = 1000;
/// How long the pruner waits at most, between batches, for a writer that
/// waits for the lock to get it.
pub(super) const PRUNE_YIELD: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// How long a connection waits for another one's write lock.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection with the relay's settings.
pub(super) fn open_connection(path: &Path) -> Result<Connection, StoreError> {
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

impl Store {
    /// Opens (creating if missing) the database at `path`: the folder is
    /// created 0700 and the file 0600, WAL is enabled and migrations run.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // A PostgreSQL URL is not a file name: without this, a caller that
        // took one for a path would create a SQLite file named like it.
        if path.to_str().is_some_and(crate::store::postgres::is_postgres_url) {
            return Err(StoreError::Url("a PostgreSQL URL is not a SQLite database file".into()));
        }
        let create = |source| StoreError::Create { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(create)?;
        }
        if !path.exists() {
            fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path).map_err(create)?;
        }
        // Two processes opening a new database at once (the daemon and a
        // CLI command) would both read version 0 and both run the first
        // migration, and the second would fail on "table meta already
        // exists" (or, switching a new file to WAL, "database is locked").
        // An advisory lock on the file (flock, which SQLite's own fcntl
        // locks do not see) makes them set up one after the other; it is
        // released when `lock` is dropped, or when a process dies.
        let lock = fs::File::open(path).map_err(create)?;
        lock.lock().map_err(create)?;
        let mut conn = open_connection(path)?;
        Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect()).to_latest(&mut conn)?;
        drop(lock);
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            writer: Mutex::new(None),
            commits: Arc::new(AtomicU64::new(0)),
            vitals: Arc::new(Vitals::new()),
            hold_paused_time: AtomicBool::new(false),
        })
    }

    /// For tests on paused tokio time: while the poller waits for the writer
    /// thread's answer to a poll's commit, paused time must not jump ahead (tokio advances a
    /// paused clock whenever the runtime has nothing to run, and a wait on
    /// another thread's answer looks like nothing to run). With this set,
    /// the wait happens on tokio's blocking pool, which tokio counts as
    /// work, so a poll's commit takes no virtual time, as it takes almost
    /// none of the real time a test measures. The poller's other store
    /// calls already run on that pool. Without it (the daemon) the answer
    /// is awaited directly, with no extra thread hop.
    #[doc(hidden)]
    pub fn hold_paused_time_while_writing(&self) {
        self.hold_paused_time.store(true, Ordering::Relaxed);
    }

    /// The writer thread's answer to a poll's commit (see
    /// [`Store::hold_paused_time_while_writing`]). Only the poller runs on
    /// paused time in tests; the deliverer has a thread and real time of
    /// its own, so its writes are awaited directly, always.
    async fn poll_answer(
        &self,
        answer: tokio::sync::oneshot::Receiver<Result<PollWrite, StoreError>>,
    ) -> Result<PollWrite, StoreError> {
        let answered = if self.hold_paused_time.load(Ordering::Relaxed) {
            tokio::task::spawn_blocking(move || answer.blocking_recv()).await.map_err(StoreError::Task)?
        } else {
            answer.await
        };
        answered.map_err(|_| writer_gone())?
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
        let result = tokio::task::spawn_blocking(move || f(&store)).await.map_err(StoreError::Task).and_then(|r| r);
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

    /// A poll's read-decide-write, on the batching writer (group commit):
    /// see [`PollerStore::commit_poll`].
    pub async fn commit_poll(&self, job_id: String, decide: Decide) -> Result<PollWrite, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer()?.send(WriteOp::Poll(job_id, decide, reply)).map_err(|_| writer_gone())?;
        self.poll_answer(answer).await
    }

    /// Records an attempt and moves its delivery on, through the batching writer.
    pub async fn record_attempt(
        &self,
        id: i64,
        attempt: AttemptRecord,
        outcome: DeliveryOutcome,
    ) -> Result<(), StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer()?.send(WriteOp::Attempt(id, attempt, outcome, reply)).map_err(|_| writer_gone())?;
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
            .map_err(StoreError::Thread)?;
        *slot = Some(tx.clone());
        Ok(tx)
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
}

/// A row limit for SQL. `usize as i64` turned a huge limit into -1, which
/// SQLite reads as "no limit": every row into memory.
pub(super) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The columns [`read_body`] reads, in order, from `notifications n LEFT
/// JOIN answers a`.
pub(super) const BODY_COLUMNS: &str = "n.body, n.event, a.before, a.after";

/// The standard body of a notification row: the stored body itself, or
/// (when the row shares its answer) composed from its parts. The same
/// parts always compose to the same bytes, so retries and replays send
/// exactly what the first attempt sent.
pub(super) fn read_body(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<String> {
    let body: String = r.get(first)?;
    let event: Option<String> = r.get(first + 1)?;
    match (r.get::<_, Option<String>>(first + 2)?, r.get::<_, Option<String>>(first + 3)?) {
        (Some(before), Some(after)) => Ok(notification::compose(&body, &before, event.as_deref(), &after)),
        _ => Ok(body),
    }
}

pub(super) fn parse_webhooks(text: Option<&str>) -> Result<Option<Vec<String>>, StoreError> {
    text.map(|t| serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("webhook list: {e}")))).transpose()
}

pub(super) fn watch_state(name: &str) -> Result<WatchState, StoreError> {
    WatchState::from_name(name).ok_or_else(|| StoreError::Corrupt(format!("watch state {name:?}")))
}

pub(super) fn parse_labels(text: &str) -> Result<Map<String, Value>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))
}

/// The SQLite store as the loops see it: a shared handle implementing the
/// storage traits, each call on a blocking thread (the writes on the
/// batching writer).
#[derive(Debug, Clone)]
pub struct Sqlite(pub Arc<Store>);

impl PollerStore for Sqlite {
    fn schedule(&self) -> StoreFuture<'_, Schedule> {
        Box::pin(self.0.call(|s| Ok(Schedule { rev: s.watch_rev()?, watches: s.active_watches()? })))
    }

    fn schedule_since(&self, rev: i64) -> StoreFuture<'_, Schedule> {
        Box::pin(self.0.call(move |s| {
            // The scan runs four times a second: with nothing changed (the
            // usual case) it is one single-row read.
            let now = s.watch_rev()?;
            let watches = if now == rev { Vec::new() } else { s.watches_changed_since(rev)? };
            Ok(Schedule { rev: now, watches })
        }))
    }

    fn diff_context(&self, job_id: String) -> StoreFuture<'_, Option<DiffContext>> {
        Box::pin(self.0.call(move |s| s.diff_context(&job_id)))
    }

    fn commit_poll(&self, job_id: String, decide: Decide) -> StoreFuture<'_, PollWrite> {
        Box::pin(self.0.commit_poll(job_id, decide))
    }

    fn fail_watch(
        &self,
        job_id: String,
        reason: String,
        notification: NewNotification,
    ) -> StoreFuture<'_, CommitOutcome> {
        Box::pin(self.0.call(move |s| s.fail_watch(&job_id, &reason, &notification)))
    }
}

impl DelivererStore for Sqlite {
    fn paused_webhooks(&self) -> StoreFuture<'_, BTreeMap<String, (String, i64)>> {
        Box::pin(self.0.call(|s| s.paused_webhooks()))
    }

    fn pause_webhook(&self, webhook: String, reason: String) -> StoreFuture<'_, ()> {
        Box::pin(self.0.call(move |s| s.pause_webhook(&webhook, &reason)))
    }

    fn publish_concurrency(&self, limits: Vec<(String, usize)>) -> StoreFuture<'_, ()> {
        let store = Arc::clone(&self.0);
        Box::pin(async move { store.publish_concurrency(&limits).await })
    }

    fn pending_heads(&self, webhook: String, limit: usize) -> StoreFuture<'_, Vec<PendingHead>> {
        Box::pin(self.0.call(move |s| s.pending_heads(&webhook, limit)))
    }

    fn outbound(&self, ids: Vec<i64>) -> StoreFuture<'_, Vec<OutboundDelivery>> {
        Box::pin(self.0.call(move |s| s.outbound_many(&ids)))
    }

    fn first_attempt_at(&self, id: i64) -> StoreFuture<'_, Option<i64>> {
        Box::pin(self.0.call(move |s| s.first_attempt_at(id)))
    }

    fn record_attempt(&self, id: i64, attempt: AttemptRecord, outcome: DeliveryOutcome) -> StoreFuture<'_, ()> {
        Box::pin(self.0.record_attempt(id, attempt, outcome))
    }

    fn live_message(&self, job_id: String, webhook: String) -> StoreFuture<'_, Option<LiveMessage>> {
        Box::pin(self.0.call(move |s| s.live_message(&job_id, &webhook)))
    }

    fn save_live_message(&self, job_id: String, webhook: String, message: LiveMessage) -> StoreFuture<'_, ()> {
        Box::pin(self.0.call(move |s| s.save_live_message(&job_id, &webhook, &message)))
    }

    fn pending_chain(&self, job_id: String, webhook: String, limit: usize) -> StoreFuture<'_, Vec<OutboundDelivery>> {
        Box::pin(self.0.call(move |s| s.pending_chain(&job_id, &webhook, limit)))
    }

    fn recent_events(&self, job_id: String, webhook: String, up_to: i64, limit: usize) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.0.call(move |s| s.recent_events(&job_id, &webhook, up_to, limit)))
    }
}
