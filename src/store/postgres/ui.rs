//! The status page's queries on PostgreSQL: SQLite's `ui.rs` in
//! PostgreSQL's dialect, each bounded by a `LIMIT` or an index range, with
//! the same rows back (`seq` standing for `rowid` as the watches' cursor).

use std::collections::{BTreeMap, HashMap};

use super::ops::http_status;
use super::outbox::{BODY_COLUMNS, read_body};
use super::*;
use crate::store::ui::{
    Activity, DeliveryRow, DeliverySearch, JobDelivery, JobNotification, LAST_ERROR_WINDOW, LATENCY_PER_MINUTE,
    LastError, WatchRow, WatchSearch,
};

const MINUTE: i64 = 60_000;

impl Postgres {
    /// Watches matching `search`, in the order they were added.
    pub(super) async fn watch_rows(&self, search: &WatchSearch) -> Result<Vec<WatchRow>, StoreError> {
        let (key, value) = search.label.clone().unzip();
        // SQLite quotes the key into a JSON path with its quotes removed;
        // the same key is looked up here, as a key (never a path).
        let key = key.map(|k| k.replace('"', ""));
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, job_id, org_id || '/' || endpoint_name, state, state_reason, last_status, labels, created_at, updated_at
                 FROM watches
                 WHERE ($1::TEXT IS NULL OR state = $1)
                   AND ($2::TEXT IS NULL OR job_id = $2)
                   AND ($3::TEXT IS NULL OR org_id || '/' || endpoint_name = $3)
                   AND ($4::TEXT IS NULL OR (labels::JSONB ->> $4) = $5::TEXT)
                   AND seq > $6
                 ORDER BY seq LIMIT $7",
            )
            .await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &search.state,
                    &search.job_id,
                    &search.portal_id,
                    &key,
                    &value,
                    &search.after.unwrap_or(0),
                    &sql_limit(search.limit),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| WatchRow {
                seq: r.get(0),
                job_id: r.get(1),
                portal_id: r.get(2),
                state: r.get(3),
                state_reason: r.get(4),
                last_status: r.get(5),
                labels: serde_json::from_str(r.get::<_, &str>(6)).unwrap_or_default(),
                created_at: r.get(7),
                updated_at: r.get(8),
            })
            .collect())
    }

    /// Deliveries matching `search`, newest first.
    pub(super) async fn delivery_rows(&self, search: &DeliverySearch) -> Result<Vec<DeliveryRow>, StoreError> {
        // With a state, `d.state = $1` alone, so the (state, id) index serves it.
        let filter = if search.state.is_some() { "d.state = $1" } else { "$1::TEXT IS NULL" };
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT d.id, d.job_id, d.webhook, n.type, d.state, d.attempts, d.created_at, d.next_attempt_at, d.finished_at, d.last_error
                 FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                 WHERE {filter} AND ($2::TEXT IS NULL OR d.webhook = $2) AND ($3::TEXT IS NULL OR d.job_id = $3) AND d.id < $4
                 ORDER BY d.id DESC LIMIT $5"
            ))
            .await?;
        let state = search.state.map(DeliveryState::as_str);
        let before = search.before.unwrap_or(i64::MAX);
        let rows =
            client.query(&stmt, &[&state, &search.webhook, &search.job_id, &before, &sql_limit(search.limit)]).await?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryRow {
                    id: r.get(0),
                    job_id: r.get(1),
                    webhook: r.get(2),
                    kind: r.get(3),
                    state: delivery_state(r.get(4))?.as_str(),
                    attempts: count(r.get(5)),
                    created_at: r.get(6),
                    next_attempt_at: r.get(7),
                    finished_at: r.get(8),
                    last_error: r.get(9),
                })
            })
            .collect()
    }

    /// Per webhook, its most recent attempt that was not a 2xx, among the
    /// newest [`LAST_ERROR_WINDOW`] attempts.
    pub(super) async fn webhook_last_errors(&self) -> Result<BTreeMap<String, LastError>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT d.webhook, a.attempted_at, a.http_status, a.error
                 FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                 WHERE a.id > (SELECT COALESCE(MAX(id), 0) FROM attempts) - $1
                   AND (a.error IS NOT NULL OR a.http_status IS NULL OR a.http_status NOT BETWEEN 200 AND 299)
                 ORDER BY a.id DESC",
            )
            .await?;
        let mut out = BTreeMap::new();
        for r in client.query(&stmt, &[&LAST_ERROR_WINDOW]).await? {
            let error = LastError { at: r.get(1), http_status: http_status(r.get(2)), error: r.get(3) };
            out.entry(r.get(0)).or_insert(error);
        }
        Ok(out)
    }

    /// The activity of the `minutes` minutes up to the one holding
    /// `now_ms`, minute by minute, as SQLite's `activity`: one statement for
    /// the counts and one for the latencies, each minute an index range
    /// (`notifications_created`, the partial `deliveries_finished`), the
    /// latencies at most [`LATENCY_PER_MINUTE`] a minute, the newest.
    pub(super) async fn minutes(&self, now_ms: i64, minutes: usize) -> Result<Activity, StoreError> {
        let mut out = Activity::default();
        if minutes == 0 {
            return Ok(out);
        }
        let last = now_ms.div_euclid(MINUTE) * MINUTE;
        let first = last - (sql_limit(minutes) - 1) * MINUTE;
        let client = self.client().await?;
        let counts = client
            .prepare_cached(
                "SELECT m.start,
                        (SELECT COUNT(*) FROM notifications WHERE created_at >= m.start AND created_at < m.start + 60000),
                        (SELECT COUNT(*) FROM deliveries
                         WHERE state = 'delivered' AND finished_at >= m.start AND finished_at < m.start + 60000)
                 FROM generate_series($1::BIGINT, $2::BIGINT, 60000) AS m(start) ORDER BY m.start",
            )
            .await?;
        for r in client.query(&counts, &[&first, &last]).await? {
            let start: i64 = r.get(0);
            out.notifications.push((start, r.get::<_, i64>(1) as u64));
            out.delivered.push((start, r.get::<_, i64>(2) as u64));
        }
        let latencies = client
            .prepare_cached(
                "SELECT l.finished_at, l.latency FROM generate_series($1::BIGINT, $2::BIGINT, 60000) AS m(start)
                 CROSS JOIN LATERAL (
                     SELECT finished_at, finished_at - created_at AS latency FROM deliveries
                     WHERE state = 'delivered' AND finished_at >= m.start AND finished_at < m.start + 60000
                     ORDER BY finished_at DESC LIMIT $3) l
                 ORDER BY m.start, l.finished_at DESC",
            )
            .await?;
        for r in client.query(&latencies, &[&first, &last, &sql_limit(LATENCY_PER_MINUTE)]).await? {
            out.latencies.push((r.get(0), r.get(1)));
        }
        Ok(out)
    }

    /// A job's first `limit` notifications after id `after` (0: from the
    /// start), each with its deliveries and their attempts (at most
    /// `limit * 20` attempts in all), found by notification id.
    pub(super) async fn timeline(
        &self,
        job_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobNotification>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT n.id, n.type, {BODY_COLUMNS}, n.created_at FROM notifications n LEFT JOIN answers a ON a.id = n.answer_id
                 WHERE n.job_id = $1 AND n.id > $2 ORDER BY n.id LIMIT $3"
            ))
            .await?;
        let mut out: Vec<JobNotification> = client
            .query(&stmt, &[&job_id, &after, &sql_limit(limit)])
            .await?
            .iter()
            .map(|r| JobNotification {
                id: r.get(0),
                kind: r.get(1),
                body: read_body(r, 2),
                created_at: r.get(6),
                deliveries: Vec::new(),
            })
            .collect();
        let (Some(first), Some(last)) = (out.first().map(|n| n.id), out.last().map(|n| n.id)) else { return Ok(out) };
        let index: HashMap<i64, usize> = out.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let stmt = client
            .prepare_cached(
                "SELECT notification_id, id, webhook, msg_id, state, attempts, next_attempt_at, last_error
                 FROM deliveries WHERE notification_id BETWEEN $2 AND $3 AND job_id = $1 ORDER BY id",
            )
            .await?;
        let mut by_delivery = HashMap::new();
        for r in client.query(&stmt, &[&job_id, &first, &last]).await? {
            let delivery = JobDelivery {
                id: r.get(1),
                webhook: r.get(2),
                msg_id: r.get(3),
                state: delivery_state(r.get(4))?.as_str(),
                attempts: count(r.get(5)),
                next_attempt_at: r.get(6),
                last_error: r.get(7),
                tries: Vec::new(),
            };
            if let Some(&i) = index.get(&r.get::<_, i64>(0)) {
                by_delivery.insert(delivery.id, (i, out[i].deliveries.len()));
                out[i].deliveries.push(delivery);
            }
        }
        let stmt = client
            .prepare_cached(
                "SELECT a.delivery_id, a.attempted_at, a.duration_ms, a.http_status, a.response_excerpt, a.error
                 FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                 WHERE d.notification_id BETWEEN $2 AND $3 AND d.job_id = $1 ORDER BY a.id LIMIT $4",
            )
            .await?;
        let cap = sql_limit(limit.saturating_mul(20));
        for r in client.query(&stmt, &[&job_id, &first, &last, &cap]).await? {
            let attempt = AttemptRecord {
                attempted_at: r.get(1),
                duration_ms: r.get(2),
                http_status: http_status(r.get(3)),
                response_excerpt: r.get(4),
                error: r.get(5),
            };
            if let Some(&(i, j)) = by_delivery.get(&r.get::<_, i64>(0)) {
                out[i].deliveries[j].tries.push(attempt);
            }
        }
        Ok(out)
    }

    /// How many notifications a job has.
    pub(super) async fn notifications_of_job(&self, job_id: &str) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT COUNT(*) FROM notifications WHERE job_id = $1").await?;
        Ok(client.query_one(&stmt, &[&job_id]).await?.get(0))
    }
}
