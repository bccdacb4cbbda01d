//! The chain heads: the first pending delivery of every (job, webhook)
//! chain, kept in the `chain_heads` table by triggers (see the fourth
//! migration in `schema.rs`), so that finding a webhook's next heads costs
//! one index range, however many deliveries wait behind them.

use std::collections::BTreeMap;

use rusqlite::params;

use super::*;
use crate::store::*;

/// The writer's part of [`Store::publish_concurrency`]: `rows` is JSON
/// `[[webhook, concurrency], ...]`.
pub(super) fn apply_concurrency(conn: &rusqlite::Connection, rows: &str, now: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO webhook_concurrency (webhook, concurrency, updated_at)
         SELECT value ->> 0, value ->> 1, ?2 FROM json_each(?1) WHERE true
         ON CONFLICT (webhook) DO UPDATE SET concurrency = excluded.concurrency, updated_at = excluded.updated_at",
    )?
    .execute(params![rows, now])?;
    Ok(())
}

impl Store {
    /// The first pending delivery of each of `webhook`'s (job, webhook)
    /// chains, earliest due first, at most `limit`. Later deliveries of a
    /// chain wait for its head: that is the per-job, per-webhook ordering
    /// guarantee. Reads `limit` rows of `chain_heads_due` at most: a backlog
    /// of 100,000 behind 1,000 heads costs what a backlog of 1,000 does.
    pub fn pending_heads(&self, webhook: &str, limit: usize) -> Result<Vec<PendingHead>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT delivery_id, job_id, webhook, next_attempt_at FROM chain_heads
             WHERE webhook = ?1 ORDER BY next_attempt_at, delivery_id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![webhook, sql_limit(limit)], |r| {
            Ok(PendingHead { id: r.get(0)?, job_id: r.get(1)?, webhook: r.get(2)?, next_attempt_at: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores each webhook's current adaptive concurrency, now, through
    /// the batching writer, in the same transaction as the attempts around
    /// it. Not on another connection: any second writer makes the batching
    /// writer wait in SQLite's busy handler, and under load those waits
    /// stalled every chain for up to seconds at a time.
    pub async fn publish_concurrency(&self, limits: &[(String, usize)]) -> Result<(), StoreError> {
        let rows: Vec<(&str, usize)> = limits.iter().map(|(w, n)| (w.as_str(), *n)).collect();
        let rows = serde_json::to_string(&rows).expect("names and numbers serialise");
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer()?.send(WriteOp::Concurrency(rows, reply)).map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Each webhook's adaptive concurrency as last published, with when
    /// (Unix ms): a value much older than the deliverer's publishing
    /// interval means no daemon is delivering.
    pub fn webhook_concurrency(&self) -> Result<BTreeMap<String, (u64, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT webhook, concurrency, updated_at FROM webhook_concurrency")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, (r.get::<_, i64>(1)?.max(0) as u64, r.get::<_, i64>(2)?)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heads as the first three migrations found them: by scanning the
    /// pending deliveries. The triggers must always agree with it.
    const SCANNED: &str = "SELECT d.id, d.job_id, d.webhook, d.next_attempt_at FROM deliveries d
         WHERE d.state = 'pending' AND d.webhook = ?1 AND NOT EXISTS (
             SELECT 1 FROM deliveries e
             WHERE e.job_id = d.job_id AND e.webhook = d.webhook AND e.state = 'pending' AND e.id < d.id)
         ORDER BY d.next_attempt_at, d.id";

    fn scanned(store: &Store, webhook: &str) -> Vec<PendingHead> {
        let conn = store.conn();
        let mut stmt = conn.prepare(SCANNED).unwrap();
        let rows = stmt
            .query_map([webhook], |r| {
                Ok(PendingHead { id: r.get(0)?, job_id: r.get(1)?, webhook: r.get(2)?, next_attempt_at: r.get(3)? })
            })
            .unwrap();
        rows.map(Result::unwrap).collect()
    }

    fn insert(store: &Store, job: &str, webhook: &str, n: i64, at: i64) -> i64 {
        let conn = store.conn();
        conn.execute(
            "INSERT INTO notifications (job_id, type, body, created_at) VALUES (?1, 'job.event', '{}', ?2)",
            params![job, at],
        )
        .unwrap();
        let notification = conn.last_insert_rowid();
        conn.execute(
            "INSERT INTO deliveries (notification_id, job_id, webhook, msg_id, state, next_attempt_at, created_at)
             VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5)",
            params![notification, job, webhook, format!("msg_{job}_{webhook}_{n}"), at],
        )
        .unwrap();
        conn.last_insert_rowid()
    }

    /// Random inserts, deliveries, failures, reschedules, requeues and
    /// deletions: after each, the kept heads are exactly the scanned ones.
    #[test]
    fn kept_heads_always_match_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("h.db")).unwrap();
        let mut rng = fastrand::Rng::with_seed(13);
        let jobs = ["j1", "j2", "j3", "j4"];
        let webhooks = ["a", "b"];
        for step in 0..600i64 {
            let job = jobs[rng.usize(..jobs.len())];
            let webhook = webhooks[rng.usize(..webhooks.len())];
            let pending: Vec<i64> = {
                let conn = store.conn();
                let mut stmt = conn
                    .prepare("SELECT id FROM deliveries WHERE job_id = ?1 AND webhook = ?2 AND state = 'pending' ORDER BY id")
                    .unwrap();
                stmt.query_map([job, webhook], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
            };
            let conn_do = |sql: &str, id: i64, at: i64| {
                store.conn().execute(sql, params![id, at]).unwrap();
            };
            match (rng.u8(..6), pending.first()) {
                (0 | 1, _) | (_, None) => {
                    insert(&store, job, webhook, step, rng.i64(0..50));
                }
                (2, Some(&head)) => {
                    conn_do("UPDATE deliveries SET state = 'delivered', finished_at = ?2 WHERE id = ?1", head, step)
                }
                (3, Some(&head)) => {
                    conn_do("UPDATE deliveries SET state = 'failed', finished_at = ?2 WHERE id = ?1", head, step)
                }
                (4, Some(&head)) => {
                    conn_do("UPDATE deliveries SET next_attempt_at = ?2 WHERE id = ?1", head, rng.i64(0..50))
                }
                (_, Some(_)) => {
                    if rng.bool() {
                        store.retry_failed(None).unwrap();
                    } else {
                        conn_do("DELETE FROM deliveries WHERE state <> 'pending' AND id % 3 = ?1 AND ?2 = ?2", 0, 0);
                        let last = *pending.last().unwrap();
                        conn_do("DELETE FROM deliveries WHERE id = ?1 AND ?2 = ?2", last, 0);
                    }
                }
            }
            for webhook in webhooks {
                let kept = store.pending_heads(webhook, usize::MAX).unwrap();
                assert_eq!(kept, scanned(&store, webhook), "step {step}, webhook {webhook}");
            }
        }
    }

    /// The heads query reads one index range, whatever the backlog.
    #[test]
    fn heads_are_found_through_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("h.db")).unwrap();
        let conn = store.conn();
        let mut stmt = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT delivery_id, job_id, webhook, next_attempt_at FROM chain_heads
                 WHERE webhook = ?1 ORDER BY next_attempt_at, delivery_id LIMIT ?2",
            )
            .unwrap();
        let plan: Vec<String> =
            stmt.query_map(params!["a", 10], |r| r.get::<_, String>(3)).unwrap().map(Result::unwrap).collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("USING COVERING INDEX chain_heads_due") || plan.contains("USING INDEX chain_heads_due"),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "no sort: {plan}");
    }
}
