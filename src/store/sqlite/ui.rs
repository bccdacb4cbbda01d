//! The status page's queries (`/ui/`) on SQLite: every one bounded by a
//! `LIMIT` or an index range, so 100,000 watches or deliveries never make a
//! page slow. The rows and filters are `store::ui`'s, shared with PostgreSQL.

use std::collections::BTreeMap;

use rusqlite::params;

use super::{BODY_COLUMNS, Store, read_body, sql_limit};
use crate::store::ui::*;
use crate::store::{AttemptRecord, Backlog, StoreError};
use crate::vocab::{DeliveryState, now_ms};

const HOUR: i64 = 3_600_000;

impl Store {
    /// Watches matching `search`, in the order they were added.
    pub fn search_watches(&self, search: &WatchSearch) -> Result<Vec<WatchRow>, StoreError> {
        let conn = self.conn();
        let (key, value) = search.label.clone().unzip();
        // The label key goes in as a JSON path with the key quoted, so a key
        // with dots or quotes cannot change the path's meaning.
        let path = key.map(|k| format!("$.\"{}\"", k.replace('"', "")));
        let mut stmt = conn.prepare_cached(
            "SELECT rowid, job_id, org_id || '/' || endpoint_name, state, state_reason, last_status, labels, created_at, updated_at
             FROM watches
             WHERE (?1 IS NULL OR state = ?1)
               AND (?2 IS NULL OR job_id = ?2)
               AND (?3 IS NULL OR (org_id = substr(?3, 1, instr(?3, '/') - 1) AND endpoint_name = substr(?3, instr(?3, '/') + 1)))
               AND (?4 IS NULL OR json_extract(labels, ?4) = ?5)
               AND rowid > ?6
             ORDER BY rowid LIMIT ?7",
        )?;
        let bind = params![
            search.state,
            search.job_id,
            search.portal_id,
            path,
            value,
            search.after.unwrap_or(0),
            sql_limit(search.limit)
        ];
        let rows = stmt.query_map(bind, |r| {
            Ok(WatchRow {
                seq: r.get(0)?,
                job_id: r.get(1)?,
                portal_id: r.get(2)?,
                state: r.get(3)?,
                state_reason: r.get(4)?,
                last_status: r.get(5)?,
                labels: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
                created_at: r.get(7)?,
                updated_at: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deliveries matching `search`, newest first.
    pub fn search_deliveries(&self, search: &DeliverySearch) -> Result<Vec<DeliveryRow>, StoreError> {
        let conn = self.conn();
        // With a state, `d.state = ?1` alone, so the (state, id) index serves
        // it (see `list_deliveries`).
        let filter = if search.state.is_some() { "d.state = ?1" } else { "?1 IS NULL" };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT d.id, d.job_id, d.webhook, n.type, d.state, d.attempts, d.created_at, d.next_attempt_at, d.finished_at, d.last_error
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE {filter} AND (?2 IS NULL OR d.webhook = ?2) AND (?3 IS NULL OR d.job_id = ?3) AND d.id < ?4
             ORDER BY d.id DESC LIMIT ?5"
        ))?;
        let bind = params![
            search.state.map(DeliveryState::as_str),
            search.webhook,
            search.job_id,
            search.before.unwrap_or(i64::MAX),
            sql_limit(search.limit)
        ];
        let rows = stmt.query_map(bind, |r| {
            Ok((
                DeliveryRow {
                    id: r.get(0)?,
                    job_id: r.get(1)?,
                    webhook: r.get(2)?,
                    kind: r.get(3)?,
                    state: "",
                    attempts: r.get(5)?,
                    created_at: r.get(6)?,
                    next_attempt_at: r.get(7)?,
                    finished_at: r.get(8)?,
                    last_error: r.get(9)?,
                },
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut row, state) = row?;
            row.state = DeliveryState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("delivery state {state:?}")))?
                .as_str();
            out.push(row);
        }
        Ok(out)
    }

    /// Puts every failed delivery of one webhook back to pending (as
    /// [`Store::retry_failed`] does for one). Returns how many.
    pub fn retry_failed_of_webhook(&self, webhook: &str) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, finished_at = NULL
             WHERE state = 'failed' AND webhook = ?1",
            params![webhook, now_ms()],
        )?)
    }

    /// The same figures as [`Store::backlog`], read the way the overview
    /// can afford with 100,000 deliveries: pending counts from the partial
    /// `deliveries_pending_by_webhook` index alone, failed counts from the
    /// (state, id) index, and the oldest pending delivery as the lowest id
    /// (ids grow with creation), looked up once per webhook. Three times
    /// faster than one `GROUP BY` over every pending and failed row.
    pub fn webhook_backlog(&self) -> Result<BTreeMap<String, Backlog>, StoreError> {
        let conn = self.conn();
        let mut out: BTreeMap<String, Backlog> = BTreeMap::new();
        let mut pending = conn.prepare_cached(
            "SELECT webhook, COUNT(*), MIN(id) FROM deliveries INDEXED BY deliveries_pending_by_webhook
             WHERE state = 'pending' GROUP BY webhook",
        )?;
        let rows = pending.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
        let mut oldest = Vec::new();
        for row in rows {
            let (webhook, count, first) = row?;
            out.entry(webhook.clone()).or_default().pending = count;
            oldest.push((webhook, first));
        }
        let mut created = conn.prepare_cached("SELECT created_at FROM deliveries WHERE id = ?1")?;
        for (webhook, id) in oldest {
            let at: i64 = created.query_row([id], |r| r.get(0))?;
            out.entry(webhook).or_default().oldest_pending = Some(at);
        }
        let mut failed =
            conn.prepare_cached("SELECT webhook, COUNT(*) FROM deliveries WHERE state = 'failed' GROUP BY webhook")?;
        let rows = failed.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (webhook, count) = row?;
            out.entry(webhook).or_default().failed = count;
        }
        Ok(out)
    }

    /// Per webhook, its most recent attempt that was not a 2xx, among the
    /// newest [`LAST_ERROR_WINDOW`] attempts.
    pub fn last_errors(&self) -> Result<BTreeMap<String, LastError>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT d.webhook, a.attempted_at, a.http_status, a.error
             FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
             WHERE a.id > (SELECT COALESCE(MAX(id), 0) FROM attempts) - ?1
               AND (a.error IS NOT NULL OR a.http_status IS NULL OR a.http_status NOT BETWEEN 200 AND 299)
             ORDER BY a.id DESC",
        )?;
        let rows = stmt.query_map([LAST_ERROR_WINDOW], |r| {
            Ok((r.get::<_, String>(0)?, LastError { at: r.get(1)?, http_status: r.get(2)?, error: r.get(3)? }))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (webhook, error) = row?;
            out.entry(webhook).or_insert(error);
        }
        Ok(out)
    }

    /// The activity of the `minutes` minutes up to the one holding
    /// `now_ms`, minute by minute: each minute is a few index range reads
    /// (three small queries), so the cost follows the rows in the window,
    /// never the whole history, and no temporary B-tree is built.
    pub fn activity(&self, now_ms: i64, minutes: usize) -> Result<Activity, StoreError> {
        let conn = self.conn();
        // `INDEXED BY` because SQLite's planner otherwise prefers the
        // (state, id) index for `state = 'delivered'` and then reads every
        // delivered row to filter on `finished_at` (three times slower with
        // 100,000 deliveries); the partial index holds exactly these rows.
        let mut notifications =
            conn.prepare_cached("SELECT COUNT(*) FROM notifications WHERE created_at >= ?1 AND created_at < ?2")?;
        let mut delivered = conn.prepare_cached(
            "SELECT COUNT(*) FROM deliveries INDEXED BY deliveries_finished
             WHERE state = 'delivered' AND finished_at >= ?1 AND finished_at < ?2",
        )?;
        let mut latencies = conn.prepare_cached(
            "SELECT finished_at, finished_at - created_at FROM deliveries INDEXED BY deliveries_finished
             WHERE state = 'delivered' AND finished_at >= ?1 AND finished_at < ?2 ORDER BY finished_at DESC LIMIT ?3",
        )?;
        let mut out = Activity::default();
        let last = now_ms.div_euclid(60_000) * 60_000;
        for i in (0..minutes as i64).rev() {
            let start = last - i * 60_000;
            let end = start + 60_000;
            let n: i64 = notifications.query_row(params![start, end], |r| r.get(0))?;
            let d: i64 = delivered.query_row(params![start, end], |r| r.get(0))?;
            out.notifications.push((start, n as u64));
            out.delivered.push((start, d as u64));
            let rows = latencies
                .query_map(params![start, end, sql_limit(LATENCY_PER_MINUTE)], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for row in rows {
                out.latencies.push(row?);
            }
        }
        Ok(out)
    }

    /// A job's first `limit` notifications after the one with id `after`
    /// (0: from the start), each with its deliveries and their attempts (at
    /// most `limit * 20` attempts in all).
    pub fn job_timeline(&self, job_id: &str, after: i64, limit: usize) -> Result<Vec<JobNotification>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT n.id, n.type, {}, n.created_at FROM notifications n LEFT JOIN answers a ON a.id = n.answer_id
             WHERE n.job_id = ?1 AND n.id > ?2 ORDER BY n.id LIMIT ?3",
            BODY_COLUMNS
        ))?;
        let rows = stmt.query_map(params![job_id, after, sql_limit(limit)], |r| {
            Ok(JobNotification {
                id: r.get(0)?,
                kind: r.get(1)?,
                body: read_body(r, 2)?,
                created_at: r.get(6)?,
                deliveries: Vec::new(),
            })
        })?;
        let mut out: Vec<JobNotification> = rows.collect::<Result<_, _>>()?;
        let (Some(first), Some(last)) = (out.first().map(|n| n.id), out.last().map(|n| n.id)) else { return Ok(out) };
        // The page's deliveries and attempts are found by notification id
        // (`deliveries_notification`), a range as long as the page; the
        // unary `+` keeps SQLite from choosing the (job_id, ...) index
        // instead, which walks every delivery the job ever had.
        let index: std::collections::HashMap<i64, usize> = out.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let mut stmt = conn.prepare_cached(
            "SELECT notification_id, id, webhook, msg_id, state, attempts, next_attempt_at, last_error
             FROM deliveries WHERE notification_id BETWEEN ?2 AND ?3 AND +job_id = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![job_id, first, last], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(4)?,
                JobDelivery {
                    id: r.get(1)?,
                    webhook: r.get(2)?,
                    msg_id: r.get(3)?,
                    state: "",
                    attempts: r.get(5)?,
                    next_attempt_at: r.get(6)?,
                    last_error: r.get(7)?,
                    tries: Vec::new(),
                },
            ))
        })?;
        let mut by_delivery = std::collections::HashMap::new();
        for row in rows {
            let (notification, state, mut delivery) = row?;
            delivery.state = DeliveryState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("delivery state {state:?}")))?
                .as_str();
            if let Some(&i) = index.get(&notification) {
                by_delivery.insert(delivery.id, (i, out[i].deliveries.len()));
                out[i].deliveries.push(delivery);
            }
        }
        let mut stmt = conn.prepare_cached(
            "SELECT a.delivery_id, a.attempted_at, a.duration_ms, a.http_status, a.response_excerpt, a.error
             FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
             WHERE d.notification_id BETWEEN ?2 AND ?3 AND +d.job_id = ?1 ORDER BY a.id LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![job_id, first, last, sql_limit(limit.saturating_mul(20))], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                AttemptRecord {
                    attempted_at: r.get(1)?,
                    duration_ms: r.get(2)?,
                    http_status: r.get(3)?,
                    response_excerpt: r.get(4)?,
                    error: r.get(5)?,
                },
            ))
        })?;
        for row in rows {
            let (delivery, attempt) = row?;
            if let Some(&(i, j)) = by_delivery.get(&delivery) {
                out[i].deliveries[j].tries.push(attempt);
            }
        }
        Ok(out)
    }

    /// How many notifications a job has (the timeline shows the first few).
    pub fn notification_count(&self, job_id: &str) -> Result<i64, StoreError> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM notifications WHERE job_id = ?1", [job_id], |r| r.get(0))?)
    }

    /// Fills the outbox with `count` notifications of `job_id` (a finished
    /// watch on `seed/seed`), spread evenly over the hour before `now_ms`,
    /// each with one delivery to one of `webhooks` in turn: 80 % delivered
    /// (with one attempt, 5 to 500 ms after detection), 15 % pending and
    /// 5 % failed (with an error). For the status page's benchmark.
    #[doc(hidden)]
    pub fn seed_outbox_for_bench(
        &self,
        job_id: &str,
        count: usize,
        webhooks: &[&str],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO watches (job_id, org_id, endpoint_name, labels, from_now, state, rev, created_at, updated_at)
             VALUES (?1, 'seed', 'seed', '{}', 0, 'finished', 0, ?2, ?2) ON CONFLICT DO NOTHING",
            params![job_id, now_ms - HOUR],
        )?;
        let first: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM notifications", [], |r| r.get(0))?;
        let webhooks = serde_json::to_string(webhooks).expect("names serialise");
        // Set-based, so that seeding 100,000 rows takes a second, not minutes.
        tx.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?3)
             INSERT INTO notifications (job_id, type, body, created_at)
             SELECT ?1, 'job.event', '{\"type\":\"job.event\",\"data\":{\"status\":\"running\"}}', ?2 - ?4 + i * ?4 / ?3 FROM n",
            params![job_id, now_ms, count as i64, HOUR],
        )?;
        tx.execute(
            "INSERT INTO deliveries (notification_id, job_id, webhook, msg_id, state, attempts, next_attempt_at,
                 created_at, finished_at, last_error)
             SELECT n.id, n.job_id, json_extract(?2, '$[' || (n.id % json_array_length(?2)) || ']'), 'msg_bench_' || n.id,
                    CASE WHEN n.id % 20 = 0 THEN 'failed' WHEN n.id % 20 < 4 THEN 'pending' ELSE 'delivered' END,
                    CASE WHEN n.id % 20 = 0 THEN 8 ELSE 1 END, n.created_at, n.created_at,
                    CASE WHEN n.id % 20 >= 4 OR n.id % 20 = 0 THEN n.created_at + 5 + (n.id * 7919) % 495 END,
                    CASE WHEN n.id % 20 < 4 THEN 'HTTP 503' END
             FROM notifications n WHERE n.id >= ?1",
            params![first, webhooks],
        )?;
        tx.execute(
            "INSERT INTO attempts (delivery_id, attempted_at, duration_ms, http_status, error)
             SELECT d.id, d.created_at, 3, CASE WHEN d.state = 'delivered' THEN 204 ELSE 503 END,
                    CASE WHEN d.state = 'delivered' THEN NULL ELSE 'HTTP 503' END
             FROM deliveries d WHERE d.notification_id >= ?1",
            params![first],
        )?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::NewWatch;

    fn watch(job: &str, portal: &str, label: Option<(&str, &str)>) -> NewWatch {
        NewWatch {
            job_id: job.into(),
            portal: portal.parse().unwrap(),
            webhooks: None,
            labels: label.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            from_now: false,
        }
    }

    #[test]
    fn webhook_backlog_agrees_with_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.db")).unwrap();
        assert!(store.webhook_backlog().unwrap().is_empty());
        store
            .seed_outbox_for_bench("550e8400-e29b-41d4-a716-446655440000", 997, &["a", "b", "c"], 1_800_000_000_000)
            .unwrap();
        let fast = store.webhook_backlog().unwrap();
        assert_eq!(fast, store.backlog().unwrap());
        assert!(fast.values().all(|b| b.pending > 0 && b.failed > 0 && b.oldest_pending.is_some()));
        let now = 1_800_000_000_000;
        let activity = store.activity(now, 60).unwrap();
        // The 60 buckets end with the minute holding `now`, so the seeds of
        // the hour's first minute fall before them.
        let start = now - 59 * 60_000;
        let expected = (0..997).filter(|i| now - HOUR + i * HOUR / 997 >= start).count() as u64;
        assert_eq!(activity.notifications.iter().map(|m| m.1).sum::<u64>(), expected);
        assert_eq!(activity.notifications.len(), 60);
        let delivered = store.search_deliveries(&DeliverySearch {
            state: Some(DeliveryState::Delivered),
            limit: 10_000,
            ..DeliverySearch::default()
        });
        let delivered = delivered.unwrap().into_iter().filter(|d| d.finished_at.unwrap() >= start).count();
        assert_eq!(activity.delivered.iter().map(|m| m.1 as usize).sum::<usize>(), delivered);
    }

    #[test]
    fn watch_search_filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.db")).unwrap();
        let jobs: Vec<String> = (0..5).map(|i| format!("550e8400-e29b-41d4-a716-44665544000{i}")).collect();
        let watches: Vec<NewWatch> = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                let portal = if i % 2 == 0 { "acme/form" } else { "acme/other" };
                watch(j, portal, (i == 3).then_some(("customer", "a.b\"c")))
            })
            .collect();
        store.add_watches(&watches).unwrap();
        let all = |s: WatchSearch| store.search_watches(&WatchSearch { limit: 10, ..s }).unwrap();
        assert_eq!(all(WatchSearch::default()).len(), 5);
        let by_portal = all(WatchSearch { portal_id: Some("acme/form".into()), ..Default::default() });
        assert_eq!(by_portal.iter().map(|w| w.job_id.as_str()).collect::<Vec<_>>(), [&jobs[0], &jobs[2], &jobs[4]]);
        let by_label = all(WatchSearch { label: Some(("customer".into(), "a.b\"c".into())), ..Default::default() });
        assert_eq!(by_label.len(), 1);
        assert_eq!(by_label[0].job_id, jobs[3]);
        assert!(all(WatchSearch { label: Some(("customer".into(), "x".into())), ..Default::default() }).is_empty());
        let by_job = all(WatchSearch { job_id: Some(jobs[1].clone()), ..Default::default() });
        assert_eq!(by_job.len(), 1);
        // Paging: two at a time, each page after the last row of the previous.
        let first = store.search_watches(&WatchSearch { limit: 2, ..Default::default() }).unwrap();
        let second =
            store.search_watches(&WatchSearch { limit: 2, after: Some(first[1].seq), ..Default::default() }).unwrap();
        assert_eq!(second[0].job_id, jobs[2]);
    }
}
