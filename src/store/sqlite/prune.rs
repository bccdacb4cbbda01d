//! Pruning: batched, indexed, on its own connection.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::*;
use crate::store::*;

impl Store {
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
                // A pruned job's live messages go with it: nothing edits them again.
                let mut live = tx.prepare_cached("DELETE FROM live_messages WHERE job_id = ?1")?;
                for (rowid, job_id) in &rows {
                    cursor = *rowid;
                    let deleted = watch.execute(params![rowid, job_id])?;
                    if deleted > 0 {
                        live.execute(params![job_id])?;
                    }
                    summary.watches += deleted;
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
    pub(super) fn prune_batch<T>(
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
}
