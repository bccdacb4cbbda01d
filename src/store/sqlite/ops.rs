//! Operator queries (issue 17): deliveries filtered by webhook, job and
//! state, and one delivery with what was sent and every attempt, for
//! `GET /v1/deliveries[/{id}]` and `dari-relay deliveries list|show`; and
//! what `GET /v1/events` (`dari-relay tail`) streams.

use rusqlite::{OptionalExtension, params};

use super::{BODY_COLUMNS, Store, read_body, sql_limit};
use crate::store::{DeliveryDetail, DeliveryFilter, DeliverySummary, StoreError, TailAttempt, TailNotification};
use crate::vocab::{DeliveryState, ms_to_rfc3339};

const SUMMARY_COLUMNS: &str =
    "d.id, d.msg_id, d.job_id, d.webhook, n.type, d.state, d.attempts, d.next_attempt_at, d.created_at, d.last_error";

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<DeliverySummary, StoreError>> {
    let state: String = r.get(5)?;
    let Some(parsed) = DeliveryState::parse(&state) else {
        return Ok(Err(StoreError::Corrupt(format!("delivery state {state:?}"))));
    };
    let next: i64 = r.get(7)?;
    Ok(Ok(DeliverySummary {
        id: r.get(0)?,
        msg_id: r.get(1)?,
        job_id: r.get(2)?,
        webhook: r.get(3)?,
        kind: r.get(4)?,
        state: parsed.as_str(),
        attempts: r.get(6)?,
        next_attempt_at: (parsed == DeliveryState::Pending).then(|| ms_to_rfc3339(next)),
        created_at: ms_to_rfc3339(r.get(8)?),
        last_error: r.get(9)?,
    }))
}

impl Store {
    /// Deliveries matching `filter`, newest first. A job filter is served by
    /// the `deliveries_chain` index, a state filter by `deliveries_state`; a
    /// webhook alone walks ids from the newest and stops at `limit` matches.
    pub fn query_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<DeliverySummary>, StoreError> {
        let mut conditions = Vec::new();
        if filter.job_id.is_some() {
            conditions.push("d.job_id = ?1");
        }
        if filter.webhook.is_some() {
            conditions.push("d.webhook = ?2");
        }
        if filter.state.is_some() {
            conditions.push("d.state = ?3");
        }
        // Unused parameters are still bound; `?1 IS ?1` keeps each one named
        // in the statement so the numbering holds whatever is filtered.
        let filter_sql = if conditions.is_empty() { "1".to_owned() } else { conditions.join(" AND ") };
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE {filter_sql} AND (?1 IS ?1) AND (?2 IS ?2) AND (?3 IS ?3) ORDER BY d.id DESC LIMIT ?4"
        ))?;
        let rows = stmt.query_map(
            params![filter.job_id, filter.webhook, filter.state.map(DeliveryState::as_str), sql_limit(filter.limit)],
            summary,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    /// One delivery by id, with its body and attempts; `None` if there is none.
    pub fn delivery(&self, id: i64) -> Result<Option<DeliveryDetail>, StoreError> {
        let found = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS}, {BODY_COLUMNS}
                 FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                 LEFT JOIN answers a ON a.id = n.answer_id WHERE d.id = ?1"
            ))?;
            stmt.query_row([id], |r| Ok((summary(r)?, read_body(r, 10)?))).optional()?
        };
        let Some((summary, body)) = found else { return Ok(None) };
        let attempts = self.attempts(id)?;
        Ok(Some(DeliveryDetail { summary: summary?, body, attempts }))
    }
}

impl Store {
    /// The newest notification and attempt ids, where a live stream starts.
    pub fn tail_start(&self) -> Result<(i64, i64), StoreError> {
        let conn = self.conn();
        let n = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM notifications", [], |r| r.get(0))?;
        let a = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM attempts", [], |r| r.get(0))?;
        Ok((n, a))
    }

    /// Notifications after id `notification` and attempts after id `attempt`,
    /// oldest first, at most `limit` of each: both by primary key, so a
    /// stream that polls this costs two index range reads.
    pub fn tail_after(
        &self,
        notification: i64,
        attempt: i64,
        limit: usize,
    ) -> Result<(Vec<TailNotification>, Vec<TailAttempt>), StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT n.id, n.job_id, w.org_id || '/' || w.endpoint_name, n.type, n.created_at FROM notifications n
             LEFT JOIN watches w ON w.job_id = n.job_id WHERE n.id > ?1 ORDER BY n.id LIMIT ?2",
        )?;
        let notifications = stmt
            .query_map(params![notification, sql_limit(limit)], |r| {
                Ok(TailNotification {
                    id: r.get(0)?,
                    job_id: r.get(1)?,
                    portal_id: r.get(2)?,
                    kind: r.get(3)?,
                    at: ms_to_rfc3339(r.get(4)?),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = conn.prepare_cached(
            "SELECT a.id, a.delivery_id, d.webhook, d.job_id, n.type,
                    CASE WHEN a.http_status BETWEEN 200 AND 299 THEN 'delivered'
                         WHEN d.state = 'failed' AND a.id = (SELECT MAX(id) FROM attempts WHERE delivery_id = d.id)
                         THEN 'failed' ELSE 'pending' END,
                    a.http_status, a.duration_ms, a.error,
                    a.attempted_at
             FROM attempts a JOIN deliveries d ON d.id = a.delivery_id JOIN notifications n ON n.id = d.notification_id
             WHERE a.id > ?1 ORDER BY a.id LIMIT ?2",
        )?;
        let attempts = stmt
            .query_map(params![attempt, sql_limit(limit)], |r| {
                Ok(TailAttempt {
                    id: r.get(0)?,
                    delivery_id: r.get(1)?,
                    webhook: r.get(2)?,
                    job_id: r.get(3)?,
                    kind: r.get(4)?,
                    state: r.get(5)?,
                    http_status: r.get(6)?,
                    duration_ms: r.get(7)?,
                    error: r.get(8)?,
                    at: ms_to_rfc3339(r.get(9)?),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok((notifications, attempts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_delivery_is_none_and_an_empty_store_lists_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("r.db")).unwrap();
        assert_eq!(store.delivery(1).unwrap(), None);
        let filter =
            DeliveryFilter { webhook: Some("h".into()), job_id: None, state: Some(DeliveryState::Failed), limit: 10 };
        assert!(store.query_deliveries(&filter).unwrap().is_empty());
        assert!(store.query_deliveries(&DeliveryFilter { limit: 10, ..Default::default() }).unwrap().is_empty());
    }
}
