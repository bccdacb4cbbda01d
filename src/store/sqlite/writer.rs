//! The writer thread: group commit of polls and attempts.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::*;
use crate::notification::{self, Body};
use crate::store::*;
use crate::vocab::{PortalId, SeenState, WatchState, now_ms};

/// Takes the write lock and writes, then rolls back.
pub(super) fn try_write(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("UPDATE meta SET value = value WHERE key = 'watch_rev'", [])?;
    tx.rollback()?;
    Ok(())
}

/// A watch's [`DiffContext`], on any connection.
pub(super) fn read_diff_context(conn: &Connection, job_id: &str) -> Result<Option<DiffContext>, StoreError> {
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
        state: watch_state(&state)?,
        seen: SeenState { status: last_status, event_fingerprints },
    }))
}

/// Stores a poll's new state, its notifications and their deliveries,
/// provided the watch is still active; on any connection or savepoint.
pub(super) fn apply_poll(conn: &Connection, commit: &PollCommit, now: i64) -> Result<CommitOutcome, StoreError> {
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

/// Reads a watch's last-seen state, lets the poll decide, and stores what
/// it decided; on the writer's savepoint.
pub(super) fn apply_decided(
    conn: &Connection,
    job_id: &str,
    decide: Decide,
    now: i64,
) -> Result<PollWrite, StoreError> {
    let Some(before) = read_diff_context(conn, job_id)? else { return Ok(PollWrite::Skipped) };
    if before.state != WatchState::Active {
        return Ok(PollWrite::Skipped);
    }
    let Some(commit) = decide(&before) else { return Ok(PollWrite::Skipped) };
    Ok(match apply_poll(conn, &commit, now)? {
        CommitOutcome::WatchGone => PollWrite::Gone,
        CommitOutcome::Stored { deliveries } => {
            PollWrite::Stored { before: Box::new(before), commit: Box::new(commit), deliveries }
        }
    })
}

/// Records an attempt and moves its delivery on as `outcome` says; on any
/// connection or savepoint.
pub(super) fn apply_attempt(
    conn: &Connection,
    id: i64,
    attempt: &AttemptRecord,
    outcome: &DeliveryOutcome,
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
    if let DeliveryOutcome::RateLimited { at_ms, .. } = outcome {
        // Not a retry of the schedule: only the next attempt moves.
        conn.prepare_cached(
            "UPDATE deliveries SET next_attempt_at = ?2, last_error = ?3 WHERE id = ?1 AND state = 'pending'",
        )?
        .execute(params![id, at_ms, attempt.error])?;
        return Ok(());
    }
    let (state, next, finished) = match outcome {
        DeliveryOutcome::Delivered { .. } => ("delivered", attempt.attempted_at, Some(now)),
        DeliveryOutcome::RetryAt { at_ms, .. } => ("pending", *at_ms, None),
        DeliveryOutcome::GaveUp { .. } => ("failed", attempt.attempted_at, Some(now)),
        DeliveryOutcome::Paused | DeliveryOutcome::RateLimited { .. } => ("pending", attempt.attempted_at, None),
    };
    let counted = i64::from(*outcome != DeliveryOutcome::Paused);
    let error = attempt.error.clone().or_else(|| attempt.http_status.map(|s| format!("HTTP {s}")));
    conn.prepare_cached(
        "UPDATE deliveries SET state = ?2, attempts = attempts + ?6, next_attempt_at = ?3, finished_at = ?4,
             last_error = CASE WHEN ?2 = 'delivered' THEN NULL ELSE ?5 END
         WHERE id = ?1",
    )?
    .execute(params![id, state, next, finished, error, counted])?;
    Ok(())
}

/// A write for the batching writer, with where to send its result.
pub(super) enum WriteOp {
    /// A poll's read-decide-write.
    Poll(String, Decide, tokio::sync::oneshot::Sender<Result<PollWrite, StoreError>>),
    /// An attempt and its outcome.
    Attempt(i64, AttemptRecord, DeliveryOutcome, tokio::sync::oneshot::Sender<Result<(), StoreError>>),
    /// The webhooks' adaptive concurrency, as JSON `[[name, n], ...]`
    /// (see `heads::publish_concurrency`).
    Concurrency(String, tokio::sync::oneshot::Sender<Result<(), StoreError>>),
    /// Test hook: answered at once on a std channel, so a caller may block on it.
    ReadOnly(bool, std::sync::mpsc::Sender<Result<(), StoreError>>),
    /// Test hook: the writer thread ends, as if it had crashed.
    Stop(std::sync::mpsc::Sender<()>),
}

/// Most writes folded into one transaction.
pub(super) const MAX_BATCH: usize = 512;

/// The writer thread: takes every write waiting, applies each in its own
/// savepoint (so one failing write cannot undo or block the others), commits
/// them in one transaction and only then answers each. While it waits for
/// the disk, the next batch queues up: group commit, one fsync for many
/// polls. It ends when the store is dropped.
pub(super) fn writer_loop(
    mut conn: Connection,
    rx: std::sync::mpsc::Receiver<WriteOp>,
    commits: &AtomicU64,
    vitals: &Vitals,
) {
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

pub(super) fn write_batch(conn: &mut Connection, batch: Vec<WriteOp>, commits: &AtomicU64, vitals: &Vitals) {
    /// A result waiting for the commit, with its reply channel.
    enum Done {
        Unit(Result<(), StoreError>, tokio::sync::oneshot::Sender<Result<(), StoreError>>),
        Poll(Result<PollWrite, StoreError>, tokio::sync::oneshot::Sender<Result<PollWrite, StoreError>>),
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
            let e = Arc::new(e);
            for op in batch {
                match op {
                    WriteOp::Attempt(.., reply) => drop(reply.send(Err(StoreError::Commit(Arc::clone(&e))))),
                    WriteOp::Poll(.., reply) => drop(reply.send(Err(StoreError::Commit(Arc::clone(&e))))),
                    WriteOp::Concurrency(_, reply) => drop(reply.send(Err(StoreError::Commit(Arc::clone(&e))))),
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
            WriteOp::Attempt(id, attempt, outcome, reply) => {
                let result = in_savepoint(&mut tx, |c| apply_attempt(c, id, &attempt, &outcome, now));
                any_ok |= result.is_ok();
                done.push(Done::Unit(result, reply));
            }
            WriteOp::Concurrency(rows, reply) => {
                let result = in_savepoint(&mut tx, |c| super::heads::apply_concurrency(c, &rows, now));
                done.push(Done::Unit(result, reply));
            }
            WriteOp::Poll(job_id, decide, reply) => {
                let result = in_savepoint(&mut tx, |c| apply_decided(c, &job_id, decide, now));
                any_ok |= result.is_ok();
                done.push(Done::Poll(result, reply));
            }
        }
    }
    let committed = tx.commit().map_err(Arc::new);
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
                let _ = reply.send(committed.clone().map_err(StoreError::Commit).and(result));
            }
            Done::Poll(result, reply) => {
                let _ = reply.send(committed.clone().map_err(StoreError::Commit).and(result));
            }
        }
    }
}

/// Runs `f` in a savepoint of `tx`: kept if it succeeds, rolled back if not.
/// The savepoint statements are prepared once and cached: parsing them anew
/// for every write was a tenth of the writer's time.
pub(super) fn in_savepoint<T>(
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
        .unwrap_or_else(|panic| Err(StoreError::Panicked(panic_message(&panic).to_owned())));
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

pub(super) fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}

pub(super) fn writer_gone() -> StoreError {
    StoreError::WriterGone
}

pub(super) fn bump_rev(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    Ok(tx.query_row("UPDATE meta SET value = value + 1 WHERE key = 'watch_rev' RETURNING value", [], |r| r.get(0))?)
}

pub(super) fn insert_notifications(
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
        let id: i64 =
            notification.query_row(params![job_id, n.kind.to_string(), body, answer_id, event, now], |r| r.get(0))?;
        for d in &n.deliveries {
            delivery.execute(params![id, job_id, d.webhook, d.msg_id, now])?;
            count += 1;
        }
    }
    Ok(count)
}
