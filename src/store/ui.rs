//! The status page's queries (`/ui/`): every one bounded by a `LIMIT` or an
//! index range, so 100,000 watches or deliveries never make a page slow.
//!
//! They live here, in the store, because only the store runs SQL; they
//! return plain rows and the page (`crate::ui`) decides how to show them.

use rusqlite::params;

use super::{DeliveryState, Store, StoreError, read_body, sql_limit};

/// How many of the newest attempts the "last error" of each webhook is
/// looked for in: a webhook that has not failed in that many attempts shows
/// none, and the query never walks the whole history.
const LAST_ERROR_WINDOW: i64 = 5000;
/// At most this many delivered deliveries of the last hour are read for the
/// latency chart (the newest): enough for stable p99s, bounded for speed.
const LATENCY_SAMPLE: usize = 20_000;

/// A filter over watches for the watches page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchSearch {
    /// Only this state.
    pub state: Option<String>,
    /// Only this job.
    pub job_id: Option<String>,
    /// Only this portal (`org/endpoint`).
    pub portal_id: Option<String>,
    /// Only watches with this label (`key`, `value`).
    pub label: Option<(String, String)>,
    /// Only watches added after the watch with this row number (a cursor).
    pub after: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// One row of the watches page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WatchRow {
    /// The cursor of the next page.
    pub seq: i64,
    pub job_id: String,
    pub portal_id: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub last_status: Option<String>,
    /// The labels as stored (a JSON object).
    pub labels: serde_json::Value,
    /// Unix ms.
    pub created_at: i64,
    pub updated_at: i64,
}

/// A filter over deliveries for the deliveries page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliverySearch {
    pub state: Option<DeliveryState>,
    pub webhook: Option<String>,
    pub job_id: Option<String>,
    /// Only deliveries with a smaller id (newest first; a cursor).
    pub before: Option<i64>,
    pub limit: usize,
}

/// One row of a deliveries list.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub job_id: String,
    pub webhook: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: &'static str,
    pub attempts: u32,
    /// Unix ms.
    pub created_at: i64,
    pub next_attempt_at: i64,
    pub finished_at: Option<i64>,
    pub last_error: Option<String>,
}

/// A webhook's most recent failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LastError {
    /// Unix ms.
    pub at: i64,
    pub http_status: Option<u16>,
    pub error: Option<String>,
}

/// One notification of a job page, with its deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct JobNotification {
    pub id: i64,
    pub kind: String,
    /// The standard body.
    pub body: String,
    /// Unix ms.
    pub created_at: i64,
    pub deliveries: Vec<JobDelivery>,
}

/// One delivery of a job page, with every attempt.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobDelivery {
    pub id: i64,
    pub webhook: String,
    pub msg_id: String,
    pub state: &'static str,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub tries: Vec<AttemptRow>,
}

/// One attempt as the job page shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AttemptRow {
    /// Unix ms.
    pub attempted_at: i64,
    pub duration_ms: i64,
    pub http_status: Option<u16>,
    pub response_excerpt: Option<String>,
    pub error: Option<String>,
}

/// The last hour of activity, per minute, for the overview's chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activity {
    /// (minute start in Unix ms, notifications stored in it).
    pub notifications: Vec<(i64, u64)>,
    /// (minute start, deliveries that reached 2xx in it).
    pub delivered: Vec<(i64, u64)>,
    /// (finished at, detection-to-2xx milliseconds) of delivered deliveries,
    /// newest first, at most [`LATENCY_SAMPLE`].
    pub latencies: Vec<(i64, i64)>,
}

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
        let bind =
            params![search.state, search.job_id, search.portal_id, path, value, search.after.unwrap_or(0), sql_limit(search.limit)];
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
            params![webhook, super::now_ms()],
        )?)
    }

    /// Per webhook, its most recent attempt that was not a 2xx, among the
    /// newest [`LAST_ERROR_WINDOW`] attempts.
    pub fn last_errors(&self) -> Result<std::collections::BTreeMap<String, LastError>, StoreError> {
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
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (webhook, error) = row?;
            out.entry(webhook).or_insert(error);
        }
        Ok(out)
    }

    /// The activity since `since_ms`, per minute.
    pub fn activity_since(&self, since_ms: i64) -> Result<Activity, StoreError> {
        let conn = self.conn();
        let per_minute = |sql: &str| -> Result<Vec<(i64, u64)>, StoreError> {
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map([since_ms], |r| Ok((r.get::<_, i64>(0)? * 60_000, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        };
        // Both served by an index range (notifications_created,
        // deliveries_finished): only the last hour's rows are read.
        let notifications = per_minute(
            "SELECT created_at / 60000, COUNT(*) FROM notifications WHERE created_at >= ?1 GROUP BY created_at / 60000",
        )?;
        let delivered = per_minute(
            "SELECT finished_at / 60000, COUNT(*) FROM deliveries
             WHERE state = 'delivered' AND finished_at >= ?1 GROUP BY finished_at / 60000",
        )?;
        let mut stmt = conn.prepare_cached(
            "SELECT finished_at, finished_at - created_at FROM deliveries
             WHERE state = 'delivered' AND finished_at >= ?1 ORDER BY finished_at DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![since_ms, sql_limit(LATENCY_SAMPLE)], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let latencies = rows.collect::<Result<_, _>>()?;
        Ok(Activity { notifications, delivered, latencies })
    }

    /// A job's first `limit` notifications, each with its deliveries and
    /// their attempts (at most `limit * 20` attempts in all).
    pub fn job_timeline(&self, job_id: &str, limit: usize) -> Result<Vec<JobNotification>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT n.id, n.type, {}, n.created_at FROM notifications n LEFT JOIN answers a ON a.id = n.answer_id
             WHERE n.job_id = ?1 ORDER BY n.id LIMIT ?2",
            super::BODY_COLUMNS
        ))?;
        let rows = stmt.query_map(params![job_id, sql_limit(limit)], |r| {
            Ok(JobNotification {
                id: r.get(0)?,
                kind: r.get(1)?,
                body: read_body(r, 2)?,
                created_at: r.get(6)?,
                deliveries: Vec::new(),
            })
        })?;
        let mut out: Vec<JobNotification> = rows.collect::<Result<_, _>>()?;
        let Some(last) = out.last().map(|n| n.id) else { return Ok(out) };
        let index: std::collections::HashMap<i64, usize> = out.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let mut stmt = conn.prepare_cached(
            "SELECT notification_id, id, webhook, msg_id, state, attempts, next_attempt_at, last_error
             FROM deliveries WHERE job_id = ?1 AND notification_id <= ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![job_id, last], |r| {
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
             WHERE d.job_id = ?1 AND d.notification_id <= ?2 ORDER BY a.id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![job_id, last, sql_limit(limit.saturating_mul(20))], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                AttemptRow {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewWatch;

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
        let by_label =
            all(WatchSearch { label: Some(("customer".into(), "a.b\"c".into())), ..Default::default() });
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
