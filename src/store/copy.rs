//! `db copy`: every row a running relay needs, moved from one database to
//! another (SQLite or PostgreSQL, either way), engine to engine through the
//! neutral rows below. Each engine reads and writes them in its own file
//! (`sqlite/copy.rs`, `postgres/copy.rs`); [`copy`] drives the two.
//!
//! What is kept, and why: every id that orders or names something. The
//! deliveries keep their `webhook-id` (`msg_id`) and their id (the order of
//! a (job, webhook) chain), the notifications, answers and attempts their
//! ids (what the deliveries point at), the watches their order (SQLite's
//! `rowid`, PostgreSQL's `seq`) and their last-seen state (status, event
//! fingerprints, the answer's hash), and the watch revision. So a relay
//! started on the copy sends the pending deliveries with their first ids,
//! never one delivered before, and its first polls find nothing new to
//! announce. Only what a relay rebuilds on its own stays behind: SQLite's
//! published concurrency limits and PostgreSQL's lease.
//!
//! Bounded memory: the source is read in batches of [`BATCH`] rows by key,
//! inside one read-only snapshot (so the rows agree with each other even if
//! a CLI command writes meanwhile); the target is written in one
//! transaction, committed only after the last batch, so a copy that fails
//! leaves the target as it was: migrated, and empty.

use crate::store::{StoreError, StoreFuture};

/// Rows one read (and one write) moves at most.
pub const BATCH: usize = 1000;

/// The tables copied, in an order that respects their references (answers
/// before the notifications sharing them, notifications before their
/// deliveries, deliveries before their attempts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Watches,
    Answers,
    Notifications,
    Deliveries,
    Attempts,
    WebhookPauses,
    LiveMessages,
}

impl Table {
    /// Every table, in copy order.
    pub const ALL: [Table; 7] = [
        Table::Watches,
        Table::Answers,
        Table::Notifications,
        Table::Deliveries,
        Table::Attempts,
        Table::WebhookPauses,
        Table::LiveMessages,
    ];

    /// The table's name, as in both schemas and in the command's output.
    pub fn name(self) -> &'static str {
        match self {
            Table::Watches => "watches",
            Table::Answers => "answers",
            Table::Notifications => "notifications",
            Table::Deliveries => "deliveries",
            Table::Attempts => "attempts",
            Table::WebhookPauses => "webhook_pauses",
            Table::LiveMessages => "live_messages",
        }
    }
}

/// Where the next read of a table resumes: after the key of the last row
/// read (the id, the watch's order, or a text key).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum After {
    /// From the first row.
    #[default]
    Start,
    /// After this id (or watch order).
    Id(i64),
    /// After this text key (`webhook_pauses`: the webhook and an empty
    /// second part; `live_messages`: the job and the webhook).
    Key(String, String),
}

/// A watch with its last-seen state. `order` is SQLite's `rowid`,
/// PostgreSQL's `seq`: the order watches are listed in.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchRow {
    pub order: i64,
    pub job_id: String,
    pub org_id: String,
    pub endpoint_name: String,
    /// The JSON list of webhook names, as stored.
    pub webhooks: Option<String>,
    /// The JSON object of labels, as stored.
    pub labels: String,
    pub from_now: bool,
    pub state: String,
    pub state_reason: Option<String>,
    pub rev: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_status: Option<String>,
    pub event_fps: Vec<u8>,
    pub body_hash: Option<i64>,
}

/// The part of a poll's answer its notifications share.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerRow {
    pub id: i64,
    pub before: String,
    pub after: String,
}

/// A notification, its body as stored (whole, or its head with an answer).
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRow {
    pub id: i64,
    pub job_id: String,
    pub kind: String,
    pub body: String,
    pub created_at: i64,
    pub answer_id: Option<i64>,
    pub event: Option<String>,
}

/// A delivery, with its `webhook-id` (`msg_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    pub id: i64,
    pub notification_id: i64,
    pub job_id: String,
    pub webhook: String,
    pub msg_id: String,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub last_error: Option<String>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub id: i64,
    pub delivery_id: i64,
    pub attempted_at: i64,
    pub duration_ms: i64,
    pub http_status: Option<i32>,
    pub response_excerpt: Option<String>,
    pub error: Option<String>,
}

/// A webhook paused by a 410 Gone.
#[derive(Debug, Clone, PartialEq)]
pub struct PauseRow {
    pub webhook: String,
    pub reason: String,
    pub paused_at: i64,
}

/// The message a live webhook posted for a job.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveMessageRow {
    pub job_id: String,
    pub webhook: String,
    pub message_id: String,
    pub channel: Option<String>,
    pub created_at: i64,
}

/// Rows of one table, in key order.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    Watches(Vec<WatchRow>),
    Answers(Vec<AnswerRow>),
    Notifications(Vec<NotificationRow>),
    Deliveries(Vec<DeliveryRow>),
    Attempts(Vec<AttemptRow>),
    WebhookPauses(Vec<PauseRow>),
    LiveMessages(Vec<LiveMessageRow>),
}

impl Batch {
    /// The rows it holds.
    pub fn len(&self) -> usize {
        match self {
            Batch::Watches(r) => r.len(),
            Batch::Answers(r) => r.len(),
            Batch::Notifications(r) => r.len(),
            Batch::Deliveries(r) => r.len(),
            Batch::Attempts(r) => r.len(),
            Batch::WebhookPauses(r) => r.len(),
            Batch::LiveMessages(r) => r.len(),
        }
    }

    /// Whether it holds no row: the table is read to its end.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the read after this batch resumes ([`After::Start`] for an
    /// empty batch).
    pub fn last_key(&self) -> After {
        let id = |id: Option<i64>| id.map_or(After::Start, After::Id);
        match self {
            Batch::Watches(r) => id(r.last().map(|w| w.order)),
            Batch::Answers(r) => id(r.last().map(|a| a.id)),
            Batch::Notifications(r) => id(r.last().map(|n| n.id)),
            Batch::Deliveries(r) => id(r.last().map(|d| d.id)),
            Batch::Attempts(r) => id(r.last().map(|a| a.id)),
            Batch::WebhookPauses(r) => r.last().map_or(After::Start, |p| After::Key(p.webhook.clone(), String::new())),
            Batch::LiveMessages(r) => {
                r.last().map_or(After::Start, |m| After::Key(m.job_id.clone(), m.webhook.clone()))
            }
        }
    }
}

/// The number of rows of each table, in [`Table::ALL`]'s order.
pub type Counts = [u64; 7];

/// A database read for a copy. Every read after [`CopySource::begin`] sees
/// one snapshot.
pub trait CopySource: Send {
    /// What uses this database as a running relay (an instance's name, a
    /// process), if anything: a copy of a database that is being written to
    /// would miss what comes after it.
    fn in_use(&mut self) -> StoreFuture<'_, Option<String>>;
    /// Starts the snapshot every later read comes from.
    fn begin(&mut self) -> StoreFuture<'_, ()>;
    /// The rows of every table.
    fn counts(&mut self) -> StoreFuture<'_, Counts>;
    /// The watch revision (`meta`'s `watch_rev`).
    fn watch_rev(&mut self) -> StoreFuture<'_, i64>;
    /// Up to `limit` rows of `table` after `after`, in key order.
    fn read(&mut self, table: Table, after: After, limit: usize) -> StoreFuture<'_, Batch>;
}

/// A database written by a copy, in one transaction from
/// [`CopyTarget::begin`] to [`CopyTarget::commit`]; dropped before the
/// commit, it is rolled back.
pub trait CopyTarget: Send {
    /// What uses this database as a running relay, if anything.
    fn in_use(&mut self) -> StoreFuture<'_, Option<String>>;
    /// Opens the write transaction and answers how many watches the
    /// database holds already, seen inside it.
    fn begin(&mut self) -> StoreFuture<'_, u64>;
    /// Writes rows as they are, ids included.
    fn write(&mut self, batch: Batch) -> StoreFuture<'_, ()>;
    /// Sets the watch revision, makes new ids start past the copied ones,
    /// and commits.
    fn commit(&mut self, watch_rev: i64) -> StoreFuture<'_, ()>;
}

/// What a copy moved: rows per table, and the watch revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySummary {
    pub counts: Counts,
    pub watch_rev: i64,
}

/// Why a copy did not happen, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A running relay uses the source.
    #[error("the source database is in use by a running relay ({0}): stop it first, then copy")]
    SourceInUse(String),
    /// A running relay uses the target.
    #[error("the target database is in use by a running relay ({0}): stop it, or copy to another database")]
    TargetInUse(String),
    /// The target holds watches: a copy would mix two relays' histories.
    #[error(
        "the target database already holds {count} {noun}: copy only into a new, empty database",
        count = .0,
        noun = if *.0 == 1 { "watch" } else { "watches" }
    )]
    TargetNotEmpty(u64),
    /// Reading the source failed; nothing was committed to the target.
    #[error("cannot read the source database; nothing was written to the target (run again once fixed)")]
    Read(#[source] StoreError),
    /// Writing the target failed; its transaction was rolled back.
    #[error(
        "cannot write the target database; the copy was rolled back, so it holds none of it (run again once fixed; \
         if it now holds watches anyway, drop it and run again)"
    )]
    Write(#[source] StoreError),
}

impl CopyError {
    /// Whether the copy was refused before it started (the operator must
    /// change something first), rather than failing on the way.
    pub fn is_refusal(&self) -> bool {
        matches!(self, CopyError::SourceInUse(_) | CopyError::TargetInUse(_) | CopyError::TargetNotEmpty(_))
    }
}

/// Told how far a copy has come, table by table.
pub trait Progress {
    /// `table` starts, with `total` rows to copy.
    fn start(&mut self, table: Table, total: u64);
    /// `copied` rows of the current table are written so far.
    fn advance(&mut self, table: Table, copied: u64, total: u64);
    /// The current table is done.
    fn finish(&mut self, table: Table, copied: u64);
}

/// Copies every table of `source` into `target`: refused if either is in
/// use by a running relay or the target holds watches; else every row, in
/// batches, in one transaction of the target.
pub async fn copy(
    source: &mut dyn CopySource,
    target: &mut dyn CopyTarget,
    progress: &mut dyn Progress,
) -> Result<CopySummary, CopyError> {
    if let Some(by) = source.in_use().await.map_err(CopyError::Read)? {
        return Err(CopyError::SourceInUse(by));
    }
    if let Some(by) = target.in_use().await.map_err(CopyError::Write)? {
        return Err(CopyError::TargetInUse(by));
    }
    let held = target.begin().await.map_err(CopyError::Write)?;
    if held > 0 {
        return Err(CopyError::TargetNotEmpty(held));
    }
    source.begin().await.map_err(CopyError::Read)?;
    let totals = source.counts().await.map_err(CopyError::Read)?;
    let watch_rev = source.watch_rev().await.map_err(CopyError::Read)?;
    let mut counts = [0u64; 7];
    for (index, table) in Table::ALL.into_iter().enumerate() {
        progress.start(table, totals[index]);
        let mut after = After::Start;
        loop {
            let batch = source.read(table, after, BATCH).await.map_err(CopyError::Read)?;
            if batch.is_empty() {
                break;
            }
            after = batch.last_key();
            counts[index] += batch.len() as u64;
            target.write(batch).await.map_err(CopyError::Write)?;
            // A total read before the snapshot began cannot be passed.
            progress.advance(table, counts[index], totals[index].max(counts[index]));
        }
        progress.finish(table, counts[index]);
    }
    target.commit(watch_rev).await.map_err(CopyError::Write)?;
    Ok(CopySummary { counts, watch_rev })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_come_in_reference_order() {
        let position = |t: Table| Table::ALL.iter().position(|x| *x == t).unwrap();
        assert!(position(Table::Answers) < position(Table::Notifications));
        assert!(position(Table::Notifications) < position(Table::Deliveries));
        assert!(position(Table::Deliveries) < position(Table::Attempts));
        let mut sorted = Table::ALL;
        sorted.sort();
        assert_eq!(sorted, Table::ALL);
    }

    #[test]
    fn a_batch_resumes_after_its_last_key() {
        let pause = |w: &str| PauseRow { webhook: w.into(), reason: "410".into(), paused_at: 1 };
        assert_eq!(Batch::Answers(Vec::new()).last_key(), After::Start);
        let answers = Batch::Answers(vec![
            AnswerRow { id: 3, before: String::new(), after: String::new() },
            AnswerRow { id: 9, before: String::new(), after: String::new() },
        ]);
        assert_eq!(answers.last_key(), After::Id(9));
        assert_eq!(Batch::WebhookPauses(vec![pause("a"), pause("b")]).last_key(), After::Key("b".into(), "".into()));
    }
}
