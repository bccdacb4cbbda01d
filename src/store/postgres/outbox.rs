//! The outbox on PostgreSQL: heads, outbound reads, attempts, listings,
//! retries and pauses; the same SQL as SQLite's outbox, in PostgreSQL's
//! dialect.

use std::collections::BTreeMap;

use tokio_postgres::Row;

use super::*;
use crate::notification;
use crate::vocab::now_ms;

/// The columns [`read_body`] reads, in order, from `notifications n LEFT
/// JOIN answers a`.
pub(super) const BODY_COLUMNS: &str = "n.body, n.event, a.before, a.after";

/// The standard body of a notification row: the stored body itself, or
/// composed from its parts exactly as SQLite's store composes it.
pub(super) fn read_body(r: &Row, first: usize) -> String {
    let body: String = r.get(first);
    let event: Option<String> = r.get(first + 1);
    match (r.get::<_, Option<String>>(first + 2), r.get::<_, Option<String>>(first + 3)) {
        (Some(before), Some(after)) => notification::compose(&body, &before, event.as_deref(), &after),
        _ => body,
    }
}

impl Postgres {
    /// The first pending delivery of each of `webhook`'s (job, webhook)
    /// chains, earliest first, at most `limit`: later deliveries of a chain
    /// wait for its head.
    pub(super) async fn heads(&self, webhook: &str, limit: usize) -> Result<Vec<PendingHead>, StoreError> {
        let client = self.client().await?;
        // Nothing is handed out to send by an instance that lost its
        // membership, and only the heads of the watches it owns.
        self.check_alive(&client).await?;
        // The head test as "is the chain's first pending", written so that
        // only the chain index can answer it: `e.state = d.state` (not the
        // literal) keeps the partial indexes on pending rows out of the
        // inner scan. Written as SQLite's `NOT EXISTS (... e.id < d.id)`, a
        // database without statistics yet (new, autovacuum off, or a
        // backlog that grew faster than its analyze) planned both scans on
        // the webhook's partial index: a nested loop over the whole
        // backlog, 3.6 s a call for 6,000 pending deliveries and minutes
        // for 23,000, so nothing was sent. This form takes 150 ms for
        // 23,000 without statistics and under a millisecond with them
        // (the pruner analyzes the tables); `cargo bench --bench relay --
        // --engine postgres` found it.
        const HEADS: &str = "SELECT d.id, d.job_id, d.webhook, d.next_attempt_at FROM deliveries d
                 WHERE d.state = 'pending' AND d.webhook = $1 AND d.id = (
                     SELECT e.id FROM deliveries e
                     WHERE e.job_id = d.job_id AND e.webhook = d.webhook AND e.state = d.state
                     ORDER BY e.id LIMIT 1)";
        let rows = match self.member() {
            Some(m) => {
                let stmt = client
                    .prepare_cached(&format!(
                        "{HEADS} AND EXISTS (SELECT 1 FROM watches w
                             WHERE w.job_id = d.job_id AND w.lease_owner = $3 AND w.lease_epoch = $4)
                         ORDER BY d.next_attempt_at, d.id LIMIT $2"
                    ))
                    .await?;
                client.query(&stmt, &[&webhook, &sql_limit(limit), &m.name, &m.epoch]).await?
            }
            None => {
                let stmt = client.prepare_cached(&format!("{HEADS} ORDER BY d.next_attempt_at, d.id LIMIT $2")).await?;
                client.query(&stmt, &[&webhook, &sql_limit(limit)]).await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| PendingHead { id: r.get(0), job_id: r.get(1), webhook: r.get(2), next_attempt_at: r.get(3) })
            .collect())
    }

    /// Deliveries with their notifications, for sending, in id order.
    pub(super) async fn outbound_many(&self, ids: &[i64]) -> Result<Vec<OutboundDelivery>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT d.id, d.msg_id, d.webhook, d.job_id, n.type, {BODY_COLUMNS}, d.attempts, n.created_at
                 FROM deliveries d JOIN notifications n ON n.id = d.notification_id LEFT JOIN answers a ON a.id = n.answer_id
                 WHERE d.id = ANY($1) ORDER BY d.id"
            ))
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        // In chunks, so that one call never builds an unbounded statement.
        for chunk in ids.chunks(OUTBOUND_CHUNK) {
            for r in client.query(&stmt, &[&chunk]).await? {
                out.push(OutboundDelivery {
                    id: r.get(0),
                    msg_id: r.get(1),
                    webhook: r.get(2),
                    job_id: r.get(3),
                    kind: r.get(4),
                    body: read_body(&r, 5),
                    attempts: count(r.get(9)),
                    detected_at: r.get(10),
                });
            }
        }
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    /// When a delivery was first attempted (Unix ms), if it was.
    pub(super) async fn first_attempt(&self, id: i64) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT MIN(attempted_at) FROM attempts WHERE delivery_id = $1").await?;
        Ok(client.query_one(&stmt, &[&id]).await?.get(0))
    }

    /// Records an attempt and moves its delivery on as `outcome` says, in
    /// one transaction; the same updates as SQLite's `apply_attempt`.
    pub(super) async fn record(
        &self,
        id: i64,
        attempt: &AttemptRecord,
        outcome: &DeliveryOutcome,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        self.check_owner_of_delivery(&tx, id).await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO attempts (delivery_id, attempted_at, duration_ms, http_status, response_excerpt, error)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        let status = attempt.http_status.map(i32::from);
        tx.execute(
            &insert,
            &[&id, &attempt.attempted_at, &attempt.duration_ms, &status, &attempt.response_excerpt, &attempt.error],
        )
        .await?;
        if let DeliveryOutcome::RateLimited { at_ms, .. } = outcome {
            // Not a retry of the schedule: only the next attempt moves.
            let stmt = tx
                .prepare_cached(
                    "UPDATE deliveries SET next_attempt_at = $2, last_error = $3 WHERE id = $1 AND state = 'pending'",
                )
                .await?;
            tx.execute(&stmt, &[&id, at_ms, &attempt.error]).await?;
        } else {
            let now = now_ms();
            let (state, next, finished) = match outcome {
                DeliveryOutcome::Delivered { .. } => ("delivered", attempt.attempted_at, Some(now)),
                DeliveryOutcome::RetryAt { at_ms, .. } => ("pending", *at_ms, None),
                DeliveryOutcome::GaveUp { .. } => ("failed", attempt.attempted_at, Some(now)),
                DeliveryOutcome::Paused | DeliveryOutcome::RateLimited { .. } => {
                    ("pending", attempt.attempted_at, None)
                }
            };
            let counted = i32::from(*outcome != DeliveryOutcome::Paused);
            let error = attempt.error.clone().or_else(|| attempt.http_status.map(|s| format!("HTTP {s}")));
            let stmt = tx
                .prepare_cached(
                    "UPDATE deliveries SET state = $2, attempts = attempts + $6, next_attempt_at = $3, finished_at = $4,
                         last_error = CASE WHEN $2 = 'delivered' THEN NULL ELSE $5 END
                     WHERE id = $1",
                )
                .await?;
            tx.execute(&stmt, &[&id, &state, &next, &finished, &error, &counted]).await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(())
    }

    /// Deliveries for `deliveries list`, newest first, at most `limit`.
    pub(super) async fn deliveries(
        &self,
        state: Option<DeliveryState>,
        limit: usize,
    ) -> Result<Vec<DeliverySummary>, StoreError> {
        let client = self.client().await?;
        // With a state, `d.state = $1` alone, so the (state, id) index
        // serves it (as on SQLite: `$1 IS NULL OR ...` would walk every
        // delivery kept to find the few failed ones).
        let filter = if state.is_some() { "d.state = $1" } else { "$1::TEXT IS NULL" };
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS}
                 FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                 WHERE {filter} ORDER BY d.id DESC LIMIT $2",
                SUMMARY_COLUMNS = super::ops::SUMMARY_COLUMNS
            ))
            .await?;
        let rows = client.query(&stmt, &[&state.map(DeliveryState::as_str), &sql_limit(limit)]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(super::ops::summary(&r)?);
        }
        Ok(out)
    }

    /// Puts failed deliveries back to pending on a fresh schedule, their
    /// `webhook-id` unchanged: one by id, or every failed one.
    pub(super) async fn requeue_failed(&self, id: Option<i64>) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $2, finished_at = NULL
                 WHERE state = 'failed' AND ($1::BIGINT IS NULL OR id = $1) RETURNING job_id",
                &[&id, &now_ms()],
            )
            .await?;
        let jobs: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        give_work_an_owner(&tx, &jobs).await?;
        tx.commit().await?;
        self.committed();
        Ok(rows.len())
    }

    /// Pauses a webhook (a 410 Gone). Idempotent.
    pub(super) async fn pause(&self, webhook: &str, reason: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO webhook_pauses (webhook, reason, paused_at) VALUES ($1, $2, $3) ON CONFLICT (webhook) DO NOTHING",
                &[&webhook, &reason, &now_ms()],
            )
            .await?;
        self.committed();
        Ok(())
    }

    /// Resumes a paused webhook; `false` if it was not paused.
    pub(super) async fn resume(&self, webhook: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = client.execute("DELETE FROM webhook_pauses WHERE webhook = $1", &[&webhook]).await?;
        self.committed();
        Ok(changed == 1)
    }

    /// Paused webhooks with why and since when (Unix ms).
    pub(super) async fn paused(&self) -> Result<BTreeMap<String, (String, i64)>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT webhook, reason, paused_at FROM webhook_pauses").await?;
        Ok(client.query(&stmt, &[]).await?.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
    }

    /// Per webhook: pending and failed deliveries, and the oldest pending
    /// one's creation time (Unix ms).
    pub async fn backlog(&self) -> Result<BTreeMap<String, Backlog>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT webhook, COUNT(*) FILTER (WHERE state = 'pending'), COUNT(*) FILTER (WHERE state = 'failed'),
                     MIN(created_at) FILTER (WHERE state = 'pending')
                 FROM deliveries WHERE state IN ('pending', 'failed') GROUP BY webhook",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), Backlog { pending: r.get(1), failed: r.get(2), oldest_pending: r.get(3) }))
            .collect())
    }

    /// Counts of deliveries per state.
    pub async fn delivery_counts(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let client = self.client().await?;
        let rows = client.query("SELECT state, COUNT(*) FROM deliveries GROUP BY state", &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every attempt of a delivery, oldest first.
    pub(super) async fn attempts_of(&self, delivery_id: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT attempted_at, duration_ms, http_status, response_excerpt, error FROM attempts
                 WHERE delivery_id = $1 ORDER BY id",
            )
            .await?;
        let rows = client.query(&stmt, &[&delivery_id]).await?;
        Ok(rows
            .iter()
            .map(|r| AttemptRecord {
                attempted_at: r.get(0),
                duration_ms: r.get(1),
                http_status: r.get::<_, Option<i32>>(2).and_then(|s| u16::try_from(s).ok()),
                response_excerpt: r.get(3),
                error: r.get(4),
            })
            .collect())
    }

    /// A job's notifications in order, each with its deliveries.
    pub(super) async fn notifications(&self, job_id: &str) -> Result<Vec<StoredNotification>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT n.id, n.type, {BODY_COLUMNS}, n.created_at, d.webhook, d.msg_id, d.state, d.attempts
                 FROM notifications n LEFT JOIN deliveries d ON d.notification_id = n.id LEFT JOIN answers a ON a.id = n.answer_id
                 WHERE n.job_id = $1 ORDER BY n.id, d.id"
            ))
            .await?;
        let mut out: Vec<StoredNotification> = Vec::new();
        for r in client.query(&stmt, &[&job_id]).await? {
            let id: i64 = r.get(0);
            if out.last().is_none_or(|n| n.id != id) {
                out.push(StoredNotification {
                    id,
                    kind: r.get(1),
                    body: read_body(&r, 2),
                    created_at: r.get(6),
                    deliveries: Vec::new(),
                });
            }
            let (webhook, msg_id, state): (Option<String>, Option<String>, Option<String>) =
                (r.get(7), r.get(8), r.get(9));
            if let (Some(webhook), Some(msg_id), Some(state)) = (webhook, msg_id, state) {
                let attempts = count(r.get::<_, Option<i32>>(10).unwrap_or(0));
                let last = out.last_mut().expect("pushed above");
                last.deliveries.push(StoredDelivery { webhook, msg_id, state: delivery_state(&state)?, attempts });
            }
        }
        Ok(out)
    }
}

/// Pending work again for ended watches whose lease was given up when their
/// deliveries were done (see `cluster`): they get an owner that is never
/// alive, so a live instance claims them (and then sends). Watches that
/// still hold a lease, or are active, keep theirs.
pub(super) async fn give_work_an_owner(
    tx: &deadpool_postgres::Transaction<'_>,
    jobs: &[String],
) -> Result<(), StoreError> {
    if jobs.is_empty() {
        return Ok(());
    }
    tx.execute(
        "UPDATE watches SET lease_owner = '', lease_epoch = 0
         WHERE job_id = ANY($1) AND lease_owner IS NULL AND state <> 'active'",
        &[&jobs],
    )
    .await?;
    tx.execute("SELECT pg_notify($1, 'watches')", &[&super::cluster::CHANNEL]).await?;
    Ok(())
}
