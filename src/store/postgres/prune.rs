//! Pruning on PostgreSQL: the same three passes as SQLite's, in
//! transactions of at most [`PRUNE_BATCH`] rows found through an index, so
//! that polls and attempts on other connections are never held up for
//! more than a batch. Several instances may prune at once without harm
//! (each batch is a transaction and re-checks what it deletes); an
//! advisory lock makes the others skip a round instead of doing the same
//! work twice. Each round ends with an `ANALYZE` of the busy tables.

use super::*;

/// Rows one pruning transaction handles at most.
const PRUNE_BATCH: i64 = 1000;

/// The advisory lock held while one instance prunes ("prun" in ASCII).
const PRUNE_LOCK: i64 = 0x7072_756e;

impl Postgres {
    /// Deletes what is past `cutoff_ms`, as SQLite's `Store::prune`:
    /// delivered deliveries with their attempts, notifications left with no
    /// deliveries (and answers left with no notifications), and watches
    /// that ended before it with no notifications left. Pending and failed
    /// work is never pruned. When another instance is pruning, this one
    /// prunes nothing this time.
    pub(super) async fn prune_before(&self, cutoff_ms: i64) -> Result<PruneSummary, StoreError> {
        let mut client = self.client().await?;
        let locked: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&PRUNE_LOCK]).await?.get(0);
        if !locked {
            return Ok(PruneSummary::default());
        }
        let mut result = self.prune_batches(&mut client, cutoff_ms).await;
        if result.is_ok() {
            // Fresh statistics for the planner, whatever autovacuum does
            // (it may be off): without them the outbox's queries are
            // planned for empty tables (see `heads`).
            if let Err(e) = client.batch_execute("ANALYZE watches, notifications, deliveries, attempts").await {
                result = Err(e.into());
            }
        }
        let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&PRUNE_LOCK]).await;
        let summary = result?;
        unlocked?;
        Ok(summary)
    }

    async fn prune_batches(
        &self,
        client: &mut deadpool_postgres::Object,
        cutoff_ms: i64,
    ) -> Result<PruneSummary, StoreError> {
        let mut summary = PruneSummary::default();
        loop {
            let tx = client.transaction().await?;
            let ids: Vec<i64> = tx
                .query(
                    "SELECT id FROM deliveries WHERE state = 'delivered' AND finished_at < $1
                     ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                    &[&cutoff_ms, &PRUNE_BATCH],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            summary.attempts += tx.execute("DELETE FROM attempts WHERE delivery_id = ANY($1)", &[&ids]).await? as usize;
            summary.deliveries += tx.execute("DELETE FROM deliveries WHERE id = ANY($1)", &[&ids]).await? as usize;
            tx.commit().await?;
            self.committed();
            if (ids.len() as i64) < PRUNE_BATCH {
                break;
            }
        }
        // Old notifications in (created_at, id) order from a cursor: each is
        // looked at once, and those kept (work not done) are passed over.
        let mut cursor = (i64::MIN, i64::MIN);
        loop {
            let tx = client.transaction().await?;
            let rows = tx
                .query(
                    "SELECT id, created_at FROM notifications
                     WHERE created_at < $1 AND (created_at, id) > ($2, $3) ORDER BY created_at, id LIMIT $4",
                    &[&cutoff_ms, &cursor.0, &cursor.1, &PRUNE_BATCH],
                )
                .await?;
            if let Some(last) = rows.last() {
                cursor = (last.get(1), last.get(0));
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            let mut answers: Vec<Option<i64>> = tx
                .query(
                    "DELETE FROM notifications WHERE id = ANY($1)
                         AND NOT EXISTS (SELECT 1 FROM deliveries WHERE notification_id = notifications.id)
                     RETURNING answer_id",
                    &[&ids],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            summary.notifications += answers.len();
            answers.sort_unstable();
            answers.dedup();
            let answers: Vec<i64> = answers.into_iter().flatten().collect();
            tx.execute(
                "DELETE FROM answers WHERE id = ANY($1)
                     AND NOT EXISTS (SELECT 1 FROM notifications WHERE answer_id = answers.id)",
                &[&answers],
            )
            .await?;
            tx.commit().await?;
            self.committed();
            if (rows.len() as i64) < PRUNE_BATCH {
                break;
            }
        }
        let mut cursor = 0_i64;
        loop {
            let tx = client.transaction().await?;
            let rows = tx
                .query(
                    "SELECT seq, job_id FROM watches WHERE seq > $2 AND state != 'active' AND updated_at < $1
                     ORDER BY seq LIMIT $3",
                    &[&cutoff_ms, &cursor, &PRUNE_BATCH],
                )
                .await?;
            if let Some(last) = rows.last() {
                cursor = last.get(0);
            }
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            let gone: Vec<String> = tx
                .query(
                    "DELETE FROM watches WHERE seq = ANY($1) AND state != 'active'
                         AND NOT EXISTS (SELECT 1 FROM notifications WHERE job_id = watches.job_id)
                     RETURNING job_id",
                    &[&seqs],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            summary.watches += gone.len();
            // A pruned job's live messages go with it: nothing edits them again.
            tx.execute("DELETE FROM live_messages WHERE job_id = ANY($1)", &[&gone]).await?;
            tx.commit().await?;
            self.committed();
            if (rows.len() as i64) < PRUNE_BATCH {
                break;
            }
        }
        Ok(summary)
    }
}
