//! Operator queries on PostgreSQL: SQLite's `ops.rs` (deliveries filtered by
//! webhook, job and state; one delivery with its body and attempts; what
//! `GET /v1/events` streams) in PostgreSQL's dialect, and the engine's
//! [`OperatorStore`], each call on a pooled connection.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::outbox::{BODY_COLUMNS, read_body};
use super::*;
use crate::store::operator::Tail;
use crate::store::ui::{Activity, DeliveryRow, DeliverySearch, JobNotification, LastError, WatchRow, WatchSearch};
use crate::vocab::{ms_to_rfc3339, now_ms};

/// The columns [`summary`] reads, in order (as SQLite's `SUMMARY_COLUMNS`).
pub(super) const SUMMARY_COLUMNS: &str =
    "d.id, d.msg_id, d.job_id, d.webhook, n.type, d.state, d.attempts, d.next_attempt_at, d.created_at, d.last_error";

pub(super) fn summary(r: &Row) -> Result<DeliverySummary, StoreError> {
    let state = delivery_state(r.get(5))?;
    Ok(DeliverySummary {
        id: r.get(0),
        msg_id: r.get(1),
        job_id: r.get(2),
        webhook: r.get(3),
        kind: r.get(4),
        state: state.as_str(),
        attempts: count(r.get(6)),
        next_attempt_at: (state == DeliveryState::Pending).then(|| ms_to_rfc3339(r.get(7))),
        created_at: ms_to_rfc3339(r.get(8)),
        last_error: r.get(9),
    })
}

/// An HTTP status read back from its `INTEGER` column.
pub(super) fn http_status(value: Option<i32>) -> Option<u16> {
    value.and_then(|s| u16::try_from(s).ok())
}

impl Postgres {
    /// Deliveries matching `filter`, newest first; only the filters given
    /// are in the statement, so the (job, webhook, state, id) and (state,
    /// id) indexes serve them as on SQLite.
    pub(super) async fn filtered_deliveries(
        &self,
        filter: &DeliveryFilter,
    ) -> Result<Vec<DeliverySummary>, StoreError> {
        let state = filter.state.map(DeliveryState::as_str);
        let mut conditions = Vec::new();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(job) = &filter.job_id {
            params.push(job);
            conditions.push(format!("d.job_id = ${}", params.len()));
        }
        if let Some(webhook) = &filter.webhook {
            params.push(webhook);
            conditions.push(format!("d.webhook = ${}", params.len()));
        }
        if let Some(state) = &state {
            params.push(state);
            conditions.push(format!("d.state = ${}", params.len()));
        }
        let limit = sql_limit(filter.limit);
        params.push(&limit);
        let limit_mark = params.len();
        let filter_sql = if conditions.is_empty() { "TRUE".to_owned() } else { conditions.join(" AND ") };
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                 WHERE {filter_sql} ORDER BY d.id DESC LIMIT ${limit_mark}"
            ))
            .await?;
        client.query(&stmt, &params).await?.iter().map(summary).collect()
    }

    /// One delivery by id, with its body and attempts; `None` if there is none.
    pub(super) async fn delivery_detail(&self, id: i64) -> Result<Option<DeliveryDetail>, StoreError> {
        let found = {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {SUMMARY_COLUMNS}, {BODY_COLUMNS}
                     FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                     LEFT JOIN answers a ON a.id = n.answer_id WHERE d.id = $1"
                ))
                .await?;
            client.query_opt(&stmt, &[&id]).await?
        };
        let Some(row) = found else { return Ok(None) };
        let summary = summary(&row)?;
        let body = read_body(&row, 10);
        let attempts = self.attempts_of(id).await?;
        Ok(Some(DeliveryDetail { summary, body, attempts }))
    }

    /// The newest notification and attempt ids, where a live stream starts.
    pub(super) async fn tail_ids(&self) -> Result<(i64, i64), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT COALESCE(MAX(id), 0) FROM notifications), (SELECT COALESCE(MAX(id), 0) FROM attempts)",
                &[],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Notifications after id `notification` and attempts after id
    /// `attempt`, oldest first, at most `limit` of each, by primary key.
    pub(super) async fn tail_rows(&self, notification: i64, attempt: i64, limit: usize) -> Result<Tail, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT n.id, n.job_id, w.org_id || '/' || w.endpoint_name, n.type, n.created_at FROM notifications n
                 LEFT JOIN watches w ON w.job_id = n.job_id WHERE n.id > $1 ORDER BY n.id LIMIT $2",
            )
            .await?;
        let notifications = client
            .query(&stmt, &[&notification, &sql_limit(limit)])
            .await?
            .iter()
            .map(|r| TailNotification {
                id: r.get(0),
                job_id: r.get(1),
                portal_id: r.get(2),
                kind: r.get(3),
                at: ms_to_rfc3339(r.get(4)),
            })
            .collect();
        let stmt = client
            .prepare_cached(
                "SELECT a.id, a.delivery_id, d.webhook, d.job_id, n.type,
                        CASE WHEN a.http_status BETWEEN 200 AND 299 THEN 'delivered'
                             WHEN d.state = 'failed' AND a.id = (SELECT MAX(id) FROM attempts WHERE delivery_id = d.id)
                             THEN 'failed' ELSE 'pending' END,
                        a.http_status, a.duration_ms, a.error, a.attempted_at
                 FROM attempts a JOIN deliveries d ON d.id = a.delivery_id JOIN notifications n ON n.id = d.notification_id
                 WHERE a.id > $1 ORDER BY a.id LIMIT $2",
            )
            .await?;
        let attempts = client
            .query(&stmt, &[&attempt, &sql_limit(limit)])
            .await?
            .iter()
            .map(|r| TailAttempt {
                id: r.get(0),
                delivery_id: r.get(1),
                webhook: r.get(2),
                job_id: r.get(3),
                kind: r.get(4),
                state: r.get(5),
                http_status: http_status(r.get(6)),
                duration_ms: r.get(7),
                error: r.get(8),
                at: ms_to_rfc3339(r.get(9)),
            })
            .collect();
        Ok((notifications, attempts))
    }

    /// Puts every failed delivery of one webhook back to pending.
    pub(super) async fn requeue_failed_of(&self, webhook: &str) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $2, finished_at = NULL
                 WHERE state = 'failed' AND webhook = $1 RETURNING job_id",
                &[&webhook, &now_ms()],
            )
            .await?;
        let jobs: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        // As `deliveries retry`: an ended watch whose lease went with its
        // last delivery gets an owner to claim it.
        super::outbox::give_work_an_owner(&tx, &jobs).await?;
        tx.commit().await?;
        self.committed();
        Ok(rows.len())
    }
}

impl OperatorStore for Postgres {
    fn add_watches(&self, watches: Vec<NewWatch>) -> StoreFuture<'_, AddSummary> {
        Box::pin(async move { self.add(&watches).await })
    }

    fn remove_watch(&self, job_id: String) -> StoreFuture<'_, bool> {
        Box::pin(async move { self.remove(&job_id).await })
    }

    fn query_watches(&self, query: WatchQuery) -> StoreFuture<'_, Vec<WatchSummary>> {
        Box::pin(async move { Postgres::query_watches(self, &query).await })
    }

    fn watch_counts(&self) -> StoreFuture<'_, BTreeMap<String, i64>> {
        Box::pin(Postgres::watch_counts(self))
    }

    fn list_deliveries(&self, state: Option<DeliveryState>, limit: usize) -> StoreFuture<'_, Vec<DeliverySummary>> {
        Box::pin(self.deliveries(state, limit))
    }

    fn query_deliveries(&self, filter: DeliveryFilter) -> StoreFuture<'_, Vec<DeliverySummary>> {
        Box::pin(async move { self.filtered_deliveries(&filter).await })
    }

    fn delivery(&self, id: i64) -> StoreFuture<'_, Option<DeliveryDetail>> {
        Box::pin(self.delivery_detail(id))
    }

    fn notifications_of(&self, job_id: String) -> StoreFuture<'_, Vec<StoredNotification>> {
        Box::pin(async move { self.notifications(&job_id).await })
    }

    fn attempts(&self, delivery_id: i64) -> StoreFuture<'_, Vec<AttemptRecord>> {
        Box::pin(self.attempts_of(delivery_id))
    }

    fn retry_failed(&self, id: Option<i64>) -> StoreFuture<'_, usize> {
        Box::pin(self.requeue_failed(id))
    }

    fn cluster(&self) -> StoreFuture<'_, Option<Vec<InstanceInfo>>> {
        Box::pin(async move { self.instances().await.map(Some) })
    }

    fn retry_failed_of_webhook(&self, webhook: String) -> StoreFuture<'_, usize> {
        Box::pin(async move { self.requeue_failed_of(&webhook).await })
    }

    fn delivery_counts(&self) -> StoreFuture<'_, BTreeMap<String, i64>> {
        Box::pin(Postgres::delivery_counts(self))
    }

    fn backlog(&self) -> StoreFuture<'_, BTreeMap<String, Backlog>> {
        Box::pin(Postgres::backlog(self))
    }

    fn webhook_pauses(&self) -> StoreFuture<'_, BTreeMap<String, (String, i64)>> {
        Box::pin(self.paused())
    }

    fn resume_webhook(&self, webhook: String) -> StoreFuture<'_, bool> {
        Box::pin(async move { self.resume(&webhook).await })
    }

    fn tail_start(&self) -> StoreFuture<'_, (i64, i64)> {
        Box::pin(self.tail_ids())
    }

    fn tail_after(&self, notification: i64, attempt: i64, limit: usize) -> StoreFuture<'_, Tail> {
        Box::pin(self.tail_rows(notification, attempt, limit))
    }

    fn search_watches(&self, search: WatchSearch) -> StoreFuture<'_, Vec<WatchRow>> {
        Box::pin(async move { self.watch_rows(&search).await })
    }

    fn search_deliveries(&self, search: DeliverySearch) -> StoreFuture<'_, Vec<DeliveryRow>> {
        Box::pin(async move { self.delivery_rows(&search).await })
    }

    fn last_errors(&self) -> StoreFuture<'_, BTreeMap<String, LastError>> {
        Box::pin(self.webhook_last_errors())
    }

    fn activity(&self, now_ms: i64, minutes: usize) -> StoreFuture<'_, Activity> {
        Box::pin(self.minutes(now_ms, minutes))
    }

    fn job_timeline(&self, job_id: String, after: i64, limit: usize) -> StoreFuture<'_, Vec<JobNotification>> {
        Box::pin(async move { self.timeline(&job_id, after, limit).await })
    }

    fn notification_count(&self, job_id: String) -> StoreFuture<'_, i64> {
        Box::pin(async move { self.notifications_of_job(&job_id).await })
    }

    fn prune(&self, cutoff_ms: i64) -> StoreFuture<'_, PruneSummary> {
        Box::pin(self.prune_before(cutoff_ms))
    }

    /// A real write, tried and rolled back, every time: PostgreSQL takes
    /// concurrent writers, so a probe never queues behind the relay's own
    /// writes for long.
    fn writable(&self, max_age: Duration) -> StoreFuture<'_, Result<(), String>> {
        let _ = max_age;
        Box::pin(async move { Ok(self.check_writable().await.map_err(|e| e.to_string())) })
    }
}
